"""Every micro-batch the model sees has one shape: a short epoch-end batch and the stand-in
for an all-corrupt micro-batch are padded to the micro-batch size with loss weight 0 (a new
shape makes runtime.compile recompile and cuDNN re-tune)."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from dist_diffusion.train.loop import _mean_of_real, _padded, _stand_in

ROOT = Path(__file__).resolve().parents[1]

SHAPES_PROBE = r"""
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import make_class_folders
from dist_diffusion.config import load_config
from dist_diffusion.data.prepare import prepare
from dist_diffusion.train import build_run, stream_batches, train_step

root = Path(tempfile.mkdtemp())
make_class_folders(root / "src", classes=2, per_class=18)  # 36 samples: batches of 8, 8, 8, 8, 4
cfg = load_config("configs/tiny.yaml", ["vae.enabled=false", "data.resolution=16", "model.num_classes=2",
    "train.batch_size=8", "data.num_workers=0", f"data.shards={root / 'shards'}", f"train.run_dir={root / 'run'}",
    "data.samples_per_shard=12", "data.hflip=false", "runtime.precision=fp32"])
prepare(root / "src", str(root / "shards"), cfg.data, progress=False)
run = build_run(cfg)
shapes = []
run.engine.module.register_forward_pre_hook(lambda m, args: shapes.append(list(args[0].shape)))
batches = stream_batches(run)
steps = []
for _ in range(6):  # past the epoch's end
    m = train_step(run, batches); run.state.step += 1
    steps.append({"keys": len(m["keys"]), "losses": m["per_sample"].numel(), "finite": bool(m["per_sample"].isfinite().all())})
batches.close()
print(json.dumps({"shapes": shapes, "steps": steps}))
"""


def test_a_short_epoch_end_batch_is_padded_and_weighted_out():
    out = subprocess.run([sys.executable, "-c", SHAPES_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["shapes"] == [[8, 3, 16, 16]] * 6, seen["shapes"]
    assert [s["keys"] for s in seen["steps"]] == [8, 8, 8, 8, 4, 8]  # the short batch's 4 real samples
    assert [s["losses"] for s in seen["steps"]] == [8, 8, 8, 8, 4, 8] and all(s["finite"] for s in seen["steps"])


def test_the_corrupt_stand_in_has_the_micro_batch_shape_and_weighs_nothing():
    run = SimpleNamespace(manifest={"kind": "images"}, data=SimpleNamespace(resolution=16, image_channels=3))
    stand_in = _padded(_stand_in(run), 8)
    assert stand_in["image"].shape == (8, 3, 16, 16) and stand_in["label"].shape == (8,) and stand_in["key"] == []
    latents = SimpleNamespace(manifest={"kind": "latents", "latent_shape": [4, 8, 8]}, data=run.data)
    assert _padded(_stand_in(latents), 8)["latent"].shape == (8, 4, 8, 8)
    per_sample = torch.tensor([1.0, 3.0, 100.0, 100.0], requires_grad=True)
    _mean_of_real(per_sample, 2).backward()
    assert per_sample.grad.tolist() == [0.5, 0.5, 0.0, 0.0]  # the padding adds nothing to the gradient
    assert _mean_of_real(per_sample, 0).item() == 0.0
    full = torch.tensor([1.0, 2.0])
    assert torch.equal(_mean_of_real(full, 2), full.mean())  # a full batch: the mean, as before
    short = {"image": torch.ones(3, 3, 4, 4), "label": torch.tensor([1, 2, 3]), "key": ["a", "b", "c"], "epoch": 1}
    padded = _padded(short, 5)
    assert padded["image"].shape[0] == 5 and padded["image"][3:].abs().sum() == 0
    assert padded["label"].tolist() == [1, 2, 3, 0, 0] and padded["key"] == ["a", "b", "c"] and padded["epoch"] == 1
