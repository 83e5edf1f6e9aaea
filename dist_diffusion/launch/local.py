"""Local processes, the launch side: ``dist-diffusion CMD --nproc N`` starts its ranks here
(forked from the launcher after one import, or fresh interpreters on GPUs), watches them and
passes stop signals on; drivers that run many commands (the demo, the ablation, the tests)
fork each from a server that imported the framework once. Ranks themselves never import
this: a rank knows who it is (runtime.env), not who launched it."""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys
import traceback
from typing import Callable

from ..runtime.env import free_ports

Entry = Callable[[list[str]], int]  # a command line's main(argv) -> exit code


def spawn_local(argv: list[str], nproc: int, entry: Callable[[list[str]], int] | None = None,
                preload: tuple[str, ...] = ()) -> int:
    """Run ``dist-diffusion ARGV`` as nproc local ranks with a loopback rendezvous; the
    first failure stops the others and its exit code is returned.

    Where this process may fork (:func:`_may_fork_ranks`), the ranks are forks of it that call
    ``entry(argv)``, after it imported the ``preload`` modules once: each rank then skips
    importing torch, diffusers and the framework, about 5 s of CPU a rank (most of a short
    job's startup). Otherwise each rank is a fresh ``python -m dist_diffusion.cli``."""
    import time

    port = free_ports(1)[0]
    shared = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port)}
    forking = entry is not None and _may_fork_ranks()
    if forking:
        for module in preload:
            importlib.import_module(module)
    start = (lambda env: _forked_rank(entry, argv, env)) if forking else (lambda env: _fresh_rank(argv, env))
    procs = [start({**shared, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    first_failure = 0
    with _RelayedSignals(procs):
        try:
            while any(p.poll() is None for p in procs):
                first_failure = next((p.returncode for p in procs if p.returncode not in (None, 0)), 0)
                if first_failure:
                    break  # one rank failed (or stopped): the others would wait for it forever
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            codes = [p.wait() for p in procs]
    return _shell_code(first_failure or next((c for c in codes if c != 0), 0))


def _shell_code(code: int) -> int:
    """A rank killed by signal N exits as a shell reports it, 128 + N (e.g. 130: Ctrl-C)."""
    return 128 - code if code < 0 else code


class _RelayedSignals:
    """While the launcher waits on its ranks: SIGTERM and SIGUSR1/2 are passed on to every
    rank (``docker stop`` and a plain ``kill`` reach only this process; a signal to the whole
    group reaches the ranks too, and a second copy of a preemption changes nothing), so the
    ranks save and exit 124 and the launcher returns that. Ctrl-C is not passed on: the
    terminal sends it to the whole foreground group, and a relayed copy would count as the
    second Ctrl-C that stops a rank at once."""

    RELAYED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, procs):
        self.procs, self.previous = procs, {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for number in self.RELAYED:
                self.previous[number] = signal.signal(number, self._relay)
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
        return self

    def _relay(self, signum, frame) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signum)

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _may_fork_ranks() -> bool:
    """Forked ranks are safe here: no other Python thread (a lock it holds would stay held
    in the child forever) and no GPU (CUDA does not survive a fork; a GPU job's ranks are
    fresh processes, as torch.multiprocessing requires). Nor does a multi-threaded OpenMP
    pool: a child forked after a parallel torch op hangs at its first one. That cannot be
    seen from here, so the caller of :func:`spawn_local` must have done no tensor math (the
    CLI launchers only read config and JSON before they start ranks)."""
    import threading

    import torch

    return threading.active_count() == 1 and not torch.cuda.is_available()


def _fresh_rank(argv: list[str], rank_env: dict[str, str]):
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "dist_diffusion.cli", *argv], env={**os.environ, **rank_env})


class _ForkedRank:
    """A forked rank, watched like a ``subprocess.Popen``: poll, wait, terminate, returncode."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def terminate(self) -> None:
        os.kill(self.pid, signal.SIGTERM)


def _forked_rank(entry: Callable[[list[str]], int], argv: list[str], rank_env: dict[str, str]) -> _ForkedRank:
    """Fork; the child becomes the rank and never returns into the launcher's stack (whose
    ``finally`` blocks belong to the launcher): it leaves through os._exit, after the exit
    handlers an interpreter runs when a script ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _ForkedRank(pid)
    code = 1
    try:
        os.environ.update(rank_env)
        code = entry(argv) or 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            _end_like_a_script()
        finally:
            os._exit(code)


def run_command(entry: Entry, argv: list[str], preload: tuple[str, ...] = (), *, env: dict[str, str] | None = None,
                cwd: str | os.PathLike | None = None, stdout: str | os.PathLike | None = None,
                stderr: str | os.PathLike | None = None, timeout: float | None = None) -> int:
    """``entry(ARGV)`` (the CLI's main: ``dist-diffusion ARGV``) in a process of its own, as a
    user runs it, and its exit code. ``entry`` travels to the fork server by name. The process
    is forked from multiprocessing's fork server, a clean process that imported ``entry``'s
    module and the ``preload`` modules once, so a driver running many commands (the demo, the
    ablation, the test suite) pays torch's and diffusers' import (about 5 s of CPU) once,
    not per command.
    - ``env``, ``cwd``: the command's environment and directory (default: this process's,
      as they are now);
    - ``stdout``, ``stderr``: files the command's output goes to (default: this process's);
    - ``timeout``: seconds, after which the command is stopped (SIGTERM) and
      ``subprocess.TimeoutExpired`` raised."""
    import multiprocessing
    import subprocess

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([entry.__module__, *preload])
    streams = (str(stdout) if stdout else None, str(stderr) if stderr else None)
    proc = context.Process(target=_command_process,
                           args=(entry, argv, dict(os.environ if env is None else env), str(cwd or os.getcwd()),
                                 streams))
    proc.start()
    try:
        proc.join(timeout)
        if proc.exitcode is None:
            raise subprocess.TimeoutExpired(["dist-diffusion", *argv], timeout)
    finally:
        if proc.exitcode is None:  # timed out, or this driver was stopped: so is its command
            proc.terminate()
            proc.join()
    return proc.exitcode


def _command_process(entry: Entry, argv: list[str], environ: dict[str, str], cwd: str,
                     streams: tuple[str | None, ...]) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    for fd, path in zip((1, 2), streams):
        if path:
            with open(path, "ab") as file:
                os.dup2(file.fileno(), fd)
    try:
        code = entry(argv)
    finally:
        _end_like_a_script()
    raise SystemExit(code)


def _end_like_a_script() -> None:
    """The exit handlers an interpreter runs when a script ends, and the flush of its output:
    a forked process leaves by os._exit, which skips both."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
