"""`make ablation`, shortened (a few steps; every row), end to end on the embedded stack. Its
own module, so a pytest-xdist worker can run it beside the demo's."""

import json
import sys

import pytest
from PIL import Image

from conftest import run_stopping_with_sigterm


@pytest.mark.timeout(1800)
def test_short_ablation_trains_four_unets_and_tables_every_row(tmp_path):
    from dist_diffusion.demo.ablation import COLUMNS, ROWS

    out = tmp_path / "ablation"
    cmd = [sys.executable, "-m", "dist_diffusion.demo.ablation", "--out", str(out), "--unet-steps", "6",
           "--vae-steps", "6", "--classifier-steps", "6", "--samples", "10", "--nproc", "1"]
    done = run_stopping_with_sigterm(cmd, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [r.name for r in ROWS]
    assert {r["nfe"] for r in report["rows"] if r["model"] == "latent_linear" and r["guidance_scale"] == 3} == \
        {1000, 250, 100, 50, 20, 10}
    assert rows["pixel space (no VAE)"]["domain"] == "pixel" and rows["cosine schedule"]["schedule"] == "cosine"
    flow_row = rows["rectified flow, Euler-50"]  # the base's latents, UNet and steps, as rectified flow
    assert [flow_row[k] for k in ("domain", "schedule", "sampler", "nfe")] == \
        ["latent", "rectified flow", "flow_euler", 50]
    for row in report["rows"]:
        assert row["num_samples"] == 10 and row["fid"] > 0 and 0 <= row["class_accuracy"] <= 1
        assert {key for key, _, _ in COLUMNS} <= row.keys() and row["kid"] is not None
        assert Image.open(out / row["grid"]).size[0] > 32
    exported = {m: json.loads((out / f"{m}_model/dist_diffusion.json").read_text())
                for m in ("latent_linear", "latent_cosine", "pixel_linear", "latent_flow")}
    assert exported["latent_cosine"]["schedule"] == "cosine" and exported["latent_linear"]["schedule"] == "linear"
    assert exported["latent_flow"]["process"] == "rectified_flow" and exported["latent_linear"]["process"] == "ddpm"
    from omegaconf import OmegaConf

    base, flow = (OmegaConf.load(out / m / "config.yaml") for m in ("latent_linear", "latent_flow"))
    assert (flow.model, flow.data.shards, flow.train.max_steps) == (base.model, base.data.shards, 6)
    assert json.loads((out / "latent_flow_model/config.json").read_text()) == \
        json.loads((out / "latent_linear_model/config.json").read_text())  # the same UNet
    assert json.loads((out / "pixel_linear_model/config.json").read_text())["in_channels"] == 3
    assert "| DDPM-1000 | latent |" in (out / "report.md").read_text()
    assert "| rectified flow, Euler-50 | latent | rectified flow | flow_euler | 50 |" in (out / "report.md").read_text()
    assert Image.open(out / "fid_vs_nfe.png").size[0] > 100 and "[stack down]" in done.stdout
