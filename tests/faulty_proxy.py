"""A fault-injecting TCP proxy on loopback, between a client and a real S3 server.

Connection n (counting from 1) is treated by the schedule: every ``slowdown_every``-th
gets an HTTP 503 SlowDown as its first answer and is closed; otherwise connections with
n % cut_every == 1 are reset after ``cut_after`` bytes from the server (mid-transfer).
``stalls=K``: the first K connections to get that far go silent there instead, neither
sending nor closing, so only the client's read timeout ends them; ``stalled`` counts them,
and ``abandoned_after_s`` records how long each one's client waited before it closed.
``flip_upload_byte=N`` inverts byte N of what each client connection sends (a request
corrupted in transit: the server's checksum check must refuse it).
``Blackhole`` is an endpoint that accepts connections and never answers.
Clients keep connections alive, so faults are per connection, not per request.
"""

from __future__ import annotations

import socket
import threading
import time

SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 118\r\n"
            b"Connection: close\r\n\r\n<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown"
            b"</Code><Message>Please reduce your request rate.</Message></Error>")


class FaultyProxy:
    def __init__(self, upstream_port: int, cut_every: int = 3, cut_after: int = 30_000,
                 slowdown_every: int = 4, stalls: int = 0, flip_upload_byte: int | None = None):
        self.upstream_port = upstream_port
        self.flip_upload_byte, self.flips = flip_upload_byte, 0
        self.cut_every, self.cut_after, self.slowdown_every = cut_every, cut_after, slowdown_every
        self.stalls, self.stalled, self.abandoned_after_s = stalls, 0, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = self.cuts = self.slowdowns = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.server.close()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            n = self.connections
            threading.Thread(target=self._serve, args=(client, n), daemon=True).start()

    def _serve(self, client: socket.socket, n: int) -> None:
        if self.slowdown_every and n % self.slowdown_every == 0:
            client.recv(65536)  # the request line and headers
            client.sendall(SLOWDOWN)
            self.slowdowns += 1
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        # The client is sequential: it opens connection n+1 only once n is over, after n's
        # stall (if any) was counted, so exactly `stalls` connections stall.
        stall = self.stalled < self.stalls
        cut = self.cut_every and n % self.cut_every == 1 % self.cut_every
        threading.Thread(target=self._pump, args=(client, upstream, None, self.flip_upload_byte),
                         daemon=True).start()
        self._pump(upstream, client, self.cut_after if stall or cut else None, stall=stall)

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None, flip: int | None = None,
              stall: bool = False) -> None:
        sent, last_send = 0, time.monotonic()
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if flip is not None and sent <= flip < sent + len(data):  # corrupt one byte in transit
                    data = data[:flip - sent] + bytes([data[flip - sent] ^ 0xFF]) + data[flip - sent + 1:]
                    self.flips += 1
                if limit is not None and sent + len(data) > limit:
                    if stall:  # counted before the client can see it, hence before it can give up
                        self.stalled += 1
                    else:
                        self.cuts += 1
                    if limit > sent:
                        last_send = time.monotonic()
                        dst.sendall(data[: limit - sent])
                    if stall:
                        self._swallow_until_abandoned(src, last_send)
                    break  # the connection drops mid-transfer
                last_send = time.monotonic()  # before the send: the client cannot have these bytes sooner
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # shutdown wakes the other pump's recv; close alone would not
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass

    def _swallow_until_abandoned(self, src: socket.socket, last_send: float) -> None:
        """Silent, not closed: read the server's rest until the client gives up (the other
        pump sees the client close and shuts this socket). The client's read timeout runs
        from the last bytes it got, which left here no sooner than ``last_send``: so the
        time recorded is at least the wait it made."""
        try:
            while src.recv(16384):
                pass
        finally:
            self.abandoned_after_s.append(time.monotonic() - last_send)


class Blackhole:
    """Accepts TCP connections, reads nothing, answers nothing; counts the connections."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def connections(self) -> int:
        return len(self.held)

    def __enter__(self) -> "Blackhole":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self.server.close()
        for s in self.held:
            s.close()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.held.append(client)
