"""The demo, shortened (fewer steps; the same stages), end to end on the embedded stack."""

import json
import sys

import pytest
from PIL import Image

from conftest import run_stopping_with_sigterm


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
                                      "eval untrained", "choose ema length", "sample + eval", "stack down"]
    assert [r["guidance_scale"] for r in report["results"]] == [1.0, 3.0]
    for row in report["results"]:
        assert row["sampler"] == "unipc" and row["steps"] == 4 and row["num_samples"] == 40
        assert row["fid_domain"] > 0 and 0 <= row["class_accuracy"] <= 1
    assert report["fid_domain_untrained"] > 0 and report["num_real_images"] == 1797
    assert report["quality"]["passed"] is False and not all(report["quality"]["checks"].values())
    during = report["during_training"]  # evaluated beside training: the last step (15) is always due
    assert [s["step"] for s in during["steps"]] == [15] and during["best"]["step"] == 15
    assert during["steps"][0]["num_samples"] == 200 and during["steps"][0]["fid_domain"] > 0
    ema = report["posthoc_ema"]  # the EMA length chosen after training, from the profiles' snapshots
    assert [r["sigma_rel"] for r in ema["lengths"]] == [0.05, 0.1, 0.15, 0.2] and ema["chosen"] in (0.05, 0.1, 0.15, 0.2)
    assert min(r["fid_domain"] for r in ema["lengths"]) == next(r["fid_domain"] for r in ema["lengths"]
                                                                 if r["sigma_rel"] == ema["chosen"])
    for name in ("real.png", "samples_cfg1.png", "samples_cfg3.png", "loss.png", "fid_curve.png", "fid_vs_ema_length.png"):
        assert Image.open(run_dir / name).size[0] > 100
    assert "| CFG |" in (run_dir / "report.md").read_text() and "quality bar MISSED" in out.stdout
    assert "[stack down]" in out.stdout


def test_src_takes_the_recipe_that_fits_the_image_size(tmp_path):
    from dist_diffusion.config import ConfigError
    from dist_diffusion.demo.datasets import DIGITS_UNET, folder_dataset

    for name, side in (("scans", 8), ("crops", 48)):
        for label in ("a", "b", "c"):
            folder = tmp_path / name / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (side, side), (40 * i, 80, 120)).save(folder / f"{i}.png")
    small, photos = folder_dataset(tmp_path / "scans"), folder_dataset(tmp_path / "crops")
    assert (small.unet_config, small.unet_overrides, small.num_classes) == ("configs/tiny.yaml", DIGITS_UNET, 3)
    assert (photos.unet_config, photos.vae_config) == ("configs/photos32.yaml", "configs/vae_photos32.yaml")
    assert photos.write(tmp_path / "copy") == 6 and len(list((tmp_path / "copy").glob("*/*.png"))) == 6
    (tmp_path / "flat").mkdir()
    with pytest.raises(ConfigError, match="one folder of images per class"):
        folder_dataset(tmp_path / "flat")
