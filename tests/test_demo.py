"""The demo, shortened (fewer steps; the same stages), end to end on the embedded stack."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_short_demo_runs_every_stage(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dist_diffusion.demo", "--out", str(run_dir), "--vae-steps", "10",
           "train.max_steps=15", "sample.steps=4"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run_dir / "demo.json").read_text())
    assert set(report["stages"]) == {"stack up", "digits", "prepare", "train vae", "export vae", "encode",
                                     "train unet", "export unet", "sample cfg 1", "sample cfg 3", "stack down"}
    assert report["num_samples"] == 1797
    for name in ("real.png", "samples_cfg1.png", "samples_cfg3.png"):
        assert Image.open(run_dir / name).size[0] > 100
    assert "[stack down]" in out.stdout
