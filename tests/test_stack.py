"""`dist-diffusion stack up|down|status`: idempotent, and down stops only what up started."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stack(action, root):
    return subprocess.run([sys.executable, "-m", "dist_diffusion.cli", "stack", action, "--root", str(root)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_stack_up_is_idempotent_and_down_stops_it(tmp_path):
    from dist_diffusion.stack import _load_state, stop_s3

    try:
        first = stack("up", tmp_path)
        assert first.returncode == 0, first.stderr
        assert "export AWS_ENDPOINT_URL=http://127.0.0.1:" in first.stdout
        pid = _load_state(tmp_path).pid
        again = stack("up", tmp_path)
        assert again.returncode == 0 and _load_state(tmp_path).pid == pid
        assert stack("status", tmp_path).returncode == 0
        assert stack("down", tmp_path).stdout.strip() == "stopped"
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert stack("status", tmp_path).returncode == 1
        assert stack("down", tmp_path).stdout.strip() == "nothing was running"
    finally:
        state = _load_state(tmp_path)
        if state:
            stop_s3(state.pid)
