"""The demo, shortened (fewer steps; the same stages), end to end on the embedded stack."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_stopping_with_sigterm(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run, except that a demo stopped early (its timeout, pytest-timeout's)
    gets SIGTERM first, so it stops its own S3 server; SIGKILL would orphan it."""
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


# The whole demo: about 2 minutes on 2 idle cores, over 10 on a machine two busy loops
# load (pytest-timeout's 600 s stopped it there once), hence its own limit.
@pytest.mark.timeout(1800)
def test_short_demo_runs_every_stage_and_holds_itself_to_the_bar(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dist_diffusion.demo", "--out", str(run_dir), "--vae-steps", "10",
           "--classifier-steps", "10", "--eval-samples", "40", "train.max_steps=15", "sample.steps=4"]
    out = run_stopping_with_sigterm(cmd, timeout=900)
    # 15 steps cannot draw the asked digits: the demo must say so and exit 4, report written
    assert out.returncode == 4, out.stdout[-2000:] + out.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["stages"]) == ["stack up", "digits", "prepare", "train classifier", "export classifier",
                                      "train vae", "export vae", "encode", "train unet", "export unet",
                                      "eval untrained", "sample + eval", "stack down"]
    assert [r["guidance_scale"] for r in report["results"]] == [1.0, 3.0]
    for row in report["results"]:
        assert row["sampler"] == "ddim" and row["steps"] == 4 and row["num_samples"] == 40
        assert row["fid_domain"] > 0 and 0 <= row["class_accuracy"] <= 1
    assert report["fid_domain_untrained"] > 0 and report["num_real_images"] == 1797
    assert report["quality"]["passed"] is False and not all(report["quality"]["checks"].values())
    for name in ("real.png", "samples_cfg1.png", "samples_cfg3.png", "loss.png"):
        assert Image.open(run_dir / name).size[0] > 100
    assert "| CFG |" in (run_dir / "report.md").read_text() and "quality bar MISSED" in out.stdout
    assert "[stack down]" in out.stdout


@pytest.mark.timeout(1800)
def test_short_ablation_trains_three_unets_and_tables_every_row(tmp_path):
    from dist_diffusion.ablation import COLUMNS, ROWS

    out = tmp_path / "ablation"
    cmd = [sys.executable, "-m", "dist_diffusion.ablation", "--out", str(out), "--unet-steps", "6",
           "--vae-steps", "6", "--classifier-steps", "6", "--samples", "10", "--nproc", "1"]
    done = run_stopping_with_sigterm(cmd, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [r.name for r in ROWS]
    assert {r["nfe"] for r in report["rows"] if r["model"] == "latent_linear" and r["guidance_scale"] == 3} == \
        {1000, 250, 100, 50, 20, 10}
    assert rows["pixel space (no VAE)"]["domain"] == "pixel" and rows["cosine schedule"]["schedule"] == "cosine"
    for row in report["rows"]:
        assert row["num_samples"] == 10 and row["fid"] > 0 and 0 <= row["class_accuracy"] <= 1
        assert {key for key, _, _ in COLUMNS} <= row.keys() and row["kid"] is not None
        assert Image.open(out / row["grid"]).size[0] > 32
    exported = {m: json.loads((out / f"{m}_model/dist_diffusion.json").read_text())
                for m in ("latent_linear", "latent_cosine", "pixel_linear")}
    assert exported["latent_cosine"]["schedule"] == "cosine" and exported["latent_linear"]["schedule"] == "linear"
    assert json.loads((out / "pixel_linear_model/config.json").read_text())["in_channels"] == 3
    assert "| DDPM-1000 | latent |" in (out / "report.md").read_text()
    assert Image.open(out / "fid_vs_nfe.png").size[0] > 100 and "[stack down]" in done.stdout
