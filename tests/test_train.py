"""The real DeepSpeed engine, 2 processes with gloo on CPU, shards in the embedded S3."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from conftest import make_class_folders, run_dist_diffusion
from dist_diffusion.config import DataConfig, load_config, unet_input_shape
from dist_diffusion.core.models import build_unet, build_vae

ROOT = Path(__file__).resolve().parents[1]
PIXEL = ["vae.enabled=false", "data.resolution=16", "model.num_classes=4", "train.batch_size=16",
         "train.warmup_steps=2", "train.lr=2e-3", "train.log_every=1", "data.num_workers=0",
         "data.hflip=false"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, s3_server):
    """Image shards (16 px, pixel space) and latent shards (32 px -> 8x8x4) in S3."""
    from dist_diffusion.data import storage
    from dist_diffusion.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("train-data")
    storage.s3_client().create_bucket(Bucket="train-data")
    src = make_class_folders(tmp / "src", classes=4, per_class=40)
    prepare(src, "s3://train-data/img16", DataConfig(resolution=16, samples_per_shard=40), progress=False)
    prepare(src, "s3://train-data/img32", DataConfig(resolution=32, samples_per_shard=40), progress=False)
    torch.manual_seed(0)
    tiny = load_config(ROOT / "configs/tiny.yaml")
    build_vae(tiny.vae, tiny.data).save_pretrained(tmp / "vae")
    out = run_dist_diffusion(["encode", "--shards", "s3://train-data/img32",
                              "--out", "s3://train-data/lat32", "--config", "configs/tiny.yaml",
                              f"vae.pretrained={tmp / 'vae'}"], timeout=300)
    assert out.returncode == 0, out.stderr
    return {"pixels": "s3://train-data/img16", "latents": "s3://train-data/lat32", "vae": tmp / "vae"}


def train_args(run_dir, overrides, nproc=2):
    return ["train", "--config", "configs/tiny.yaml", "--nproc", str(nproc), f"train.run_dir={run_dir}", *overrides]


def train_cmd(run_dir, overrides, nproc=2):
    return [sys.executable, "-m", "dist_diffusion.cli", *train_args(run_dir, overrides, nproc)]


def run_train(run_dir, overrides, nproc=2, expect=0):
    out = run_dist_diffusion(train_args(run_dir, overrides, nproc), timeout=600)
    assert out.returncode == expect, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_zero2_bf16_latents_loss_falls_and_export_matches(tmp_path, datasets):
    run = tmp_path / "run"
    run_train(run, ["runtime.zero_stage=2", "model.num_classes=4", "train.batch_size=16", "train.max_steps=30",
                    "train.sample_every=30", "sample.steps=5",
                    "train.warmup_steps=2", "train.lr=2e-3", "train.log_every=1", "data.num_workers=0",
                    f"data.shards={datasets['latents']}", f"vae.pretrained={datasets['vae']}"])
    curve = losses(run)
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5, curve
    assert json.loads((run / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    for folder in (run / "checkpoints").glob("step*"):  # every rank holds the same EMA: written once
        assert sorted(p.name for p in folder.glob("ema_rank*")) == ["ema_rank000.safetensors"], folder
    from PIL import Image
    grid = Image.open(run / "samples/step00000030.png")  # EMA samples, decoded by the VAE to 32 px
    assert grid.size[0] > 8 * 32

    out = run_dist_diffusion(["export", "--run-dir", str(run), "--out", str(tmp_path / "unet")], timeout=300)
    assert out.returncode == 0, out.stderr
    exported = UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    trained = load_config(run / "config.yaml")
    ours = build_unet(trained.model, unet_input_shape(trained.vae, trained.data)).eval()
    ours.load_state_dict(load_file(str(run / "checkpoints/step00000030/ema_rank000.safetensors")))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(exported(x, t, class_labels=y).sample, ours(x, t, class_labels=y).sample)


def test_zero3_bf16_pixels_sharded_ema(tmp_path, datasets):
    run = tmp_path / "run"
    # decay 0: the EMA is exactly the fp32 master weights, so its joined partitions must
    # equal DeepSpeed's own consolidation of the ZeRO-3 checkpoint
    run_train(run, PIXEL + ["runtime.zero_stage=3", "train.max_steps=30", f"data.shards={datasets['pixels']}",
                            "train.sample_every=15", "sample.steps=5",
                            "train.ema_decay=0.0", "train.ema_half_life_steps=0", "train.ema_warmup=false"])
    curve = losses(run)
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5, curve
    assert (run / "samples/step00000015.png").exists()  # EMA gathered from the ZeRO-3 partitions
    folder = run / "checkpoints/step00000030"
    assert sorted(p.name for p in folder.glob("ema_rank*")) == [f"ema_rank{r:03d}.safetensors" for r in range(2)]
    shards = [load_file(str(folder / f"ema_rank{r:03d}.safetensors")) for r in range(2)]
    per_rank = [sum(t.numel() for t in s.values()) for s in shards]
    trained = load_config(run / "config.yaml")
    total = sum(p.numel() for p in build_unet(trained.model, unet_input_shape(trained.vae, trained.data)).parameters())
    assert all(0.49 * total <= n <= 0.51 * total for n in per_rank), (per_rank, total)
    for name in ("ema", "raw"):
        args = ["--raw"] if name == "raw" else []
        out = run_dist_diffusion(["export", "--run-dir", str(run), "--out", str(tmp_path / name), *args], timeout=300)
        assert out.returncode == 0, out.stderr
    ema = load_file(str(tmp_path / "ema/diffusion_pytorch_model.safetensors"))
    raw = load_file(str(tmp_path / "raw/diffusion_pytorch_model.safetensors"))
    assert ema.keys() == raw.keys() and all(torch.equal(ema[k], raw[k]) for k in ema)


def seen(run_dir):
    """Last record per step of every rank: which samples each step consumed."""
    out = {}
    for path in sorted(Path(run_dir).glob("samples_rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out[(path.name, row["step"])] = row["keys_sha1"]
    return out


def checkpoint_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in ("COMPLETE",)
            and not p.name.startswith("state_")}


def test_exact_resume_after_kill9_equals_uninterrupted(tmp_path, datasets):
    args = PIXEL + ["runtime.zero_stage=2", "train.max_steps=12", "train.ckpt_every=4", "train.keep_last=3",
                    f"data.shards={datasets['pixels']}"]
    run_train(tmp_path / "straight", args)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoints/step00000004/COMPLETE").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before step 4"
            time.sleep(0.02)
        victim = psutil.Process(proc.pid).children()[1]  # rank 1
        victim.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    done = [int(p.name[4:]) for p in (killed / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert max(done) < 12, "the kill came too late to test anything"
    resumed = run_train(killed, args)
    assert "resumed from" in resumed.stdout

    a, b = tmp_path / "straight/checkpoints/step00000012", killed / "checkpoints/step00000012"
    files_a, files_b = checkpoint_files(a), checkpoint_files(b)
    assert files_a.keys() == files_b.keys()
    for name in files_a:  # weights, optimizer moments and EMA, bitwise
        if name.endswith(".safetensors"):
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    optim = sorted(n for n in files_a if n.endswith("optim_states.pt"))  # bf16_zero_pp_... or zero_pp_... (fp32)
    assert len(optim) == 2, sorted(files_a)
    for name in optim:
        sa = torch.load(a / name, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        sb = torch.load(b / name, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        assert _tensors_equal(sa, sb), name
    assert seen(tmp_path / "straight") == seen(killed)


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__"):  # e.g. DeepSpeed's LossScaler, which has no __eq__
        return type(a) is type(b) and _tensors_equal(vars(a), vars(b))
    return a == b


def test_crash_mid_save_resumes_from_previous_complete(tmp_path, datasets):
    args = PIXEL + ["runtime.zero_stage=2", "train.max_steps=8", "train.ckpt_every=4", "train.keep_last=2",
                    f"data.shards={datasets['pixels']}"]
    run = tmp_path / "run"
    run_train(run, args)
    final = checkpoint_files(run / "checkpoints/step00000008")
    # what a crash between the shards and the marker leaves: no COMPLETE, a torn shard
    (run / "checkpoints/step00000008/COMPLETE").unlink()
    torn = run / "checkpoints/step00000008/ema_rank000.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    again = run_train(run, args)
    assert "resumed from" in again.stdout and "step00000004" in again.stdout
    assert (run / "checkpoints/step00000008/COMPLETE").exists()
    redo = checkpoint_files(run / "checkpoints/step00000008")
    assert redo.keys() == final.keys()
    for name in (n for n in final if n.endswith(".safetensors")):  # retrained 5..8 bitwise alike
        assert final[name] == redo[name], name


def test_sigusr1_saves_and_exits_with_requeue_code_then_resumes(tmp_path, datasets):
    args = PIXEL + ["runtime.zero_stage=2", "train.max_steps=400", "train.ckpt_every=1000",
                    f"data.shards={datasets['pixels']}"]
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run, args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() or len(losses(run)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        for child in psutil.Process(proc.pid).children():
            child.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 124, stderr[-3000:]
    assert "preempted at step" in stdout
    saved = [p for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert len(saved) == 1
    step = json.loads((saved[0] / "COMPLETE").read_text())["step"]
    assert 3 <= step < 400
    resumed = run_train(run, [a for a in args if not a.startswith("train.max_steps")] + [f"train.max_steps={step + 2}"])
    assert f"resumed from {saved[0]} at step {step}" in resumed.stdout


def test_bad_input_fails_before_training(tmp_path, datasets):
    out = run_train(tmp_path / "run", PIXEL + ["data.resolution=32", f"data.shards={datasets['pixels']}"],
                    nproc=1, expect=2)
    assert "images in s3://train-data/img16 are 16px but data.resolution=32" in out.stderr
    assert "Traceback" not in out.stderr


def test_resume_with_another_model_is_refused_and_the_run_dir_is_untouched(tmp_path, datasets):
    run = tmp_path / "run"
    args = PIXEL + ["train.ckpt_every=2", "train.max_steps=2", f"data.shards={datasets['pixels']}"]
    run_train(run, args, nproc=1)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    out = run_train(run, args + ["train.max_steps=4", "model.block_out_channels=[16,32]", "train.lr=1e-3",
                                 "diffusion.prediction=v"], nproc=1, expect=2)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"error: train.run_dir={run} holds checkpoints of another model" in out.stderr
    assert "model.block_out_channels: [32, 64] -> [16, 32]; diffusion.prediction: epsilon -> v" in out.stderr
    assert "train.lr" not in out.stderr  # a hyperparameter may change on a resume
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_a_second_trainer_on_a_run_dir_in_use_is_refused_and_the_first_finishes(tmp_path, datasets):
    from conftest import logged_steps, wait_until

    run = tmp_path / "run"
    args = PIXEL + ["train.ckpt_every=5", "train.max_steps=10", f"data.shards={datasets['pixels']}"]
    first = subprocess.Popen(train_cmd(run, args, nproc=1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_until(lambda: logged_steps(run) or first.poll() is not None, 300, "the first trainer's first step",
                   interval=0.05)
        holder = psutil.Process(first.pid)
        holder.suspend()  # from a step marker: the first trainer is surely mid-run while the others try
        try:
            before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
            for nproc in (2, 1):  # refused before spawning ranks, and by rank 0 itself
                out = run_train(run, args, nproc=nproc, expect=2)
                lines = out.stderr.strip().splitlines()
                assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
                line = lines[0]
                assert line.startswith(f"error: train.run_dir={run} is in use by another trainer") and \
                    f'"pid": {first.pid}' in line, out.stderr
            assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
        finally:
            holder.resume()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
        assert logged_steps(run) == list(range(1, 11))
    finally:
        if first.poll() is None:
            first.kill()


def test_nonfinite_loss_stops_cleanly_naming_the_step(tmp_path, datasets):
    out = run_train(tmp_path / "run", PIXEL + ["train.lr=1e30", "train.max_steps=20", f"data.shards={datasets['pixels']}"],
                    nproc=1, expect=3)
    assert "loss became" in out.stderr and "at step" in out.stderr and "train.nan_policy=skip" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_rank_whose_micro_batches_are_all_corrupt_stays_in_step(tmp_path):
    """Two shards of 40; every sample of one is corrupt, so one rank's whole span (40 of the
    epoch's 80 samples) decodes to nothing. That rank steps on a zero-weight stand-in and
    the run finishes with both ranks, counting what it skipped."""
    from dist_diffusion.data import shards as shard_format
    from dist_diffusion.data.prepare import prepare
    from dist_diffusion.data.stream import parse_tar

    src = make_class_folders(tmp_path / "src", classes=4, per_class=20)
    data = tmp_path / "shards"
    prepare(src, str(data), DataConfig(resolution=16, samples_per_shard=40), progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    entry = manifest["shards"][1]
    broken = [(s["__key__"], {**s, "jpg": b"not a jpeg"}) for s in parse_tar((data / entry["name"]).read_bytes())]
    entry.update(shard_format.write_tar(data / entry["name"], [(k, {e: v for e, v in f.items() if e != "__key__"})
                                                              for k, f in broken]))
    (data / "manifest.json").write_bytes(shard_format.dumps(manifest))
    run = tmp_path / "run"
    run_train(run, PIXEL + ["train.batch_size=8", "train.max_steps=6", "data.max_corrupt_fraction=0.6",
                            f"data.shards={data}"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["loss"] is not None and r["loss"] > 0 for r in rows)  # the mean over the samples that exist
    per_rank = [[json.loads(line)["n"] for line in (run / f"samples_rank{r:03d}.jsonl").read_text().splitlines()]
                for r in range(2)]
    assert sorted(map(sum, per_rank)) == [0, 24]  # one rank trained on 6 x 4 samples, the other on none


def test_vae_recipe_trains_exports_and_feeds_encode(tmp_path, datasets):
    run = tmp_path / "vae"
    out = run_dist_diffusion(["train", "--config", "configs/vae_tiny.yaml", "--nproc", "2", f"train.run_dir={run}",
                              f"data.shards={datasets['pixels'].replace('16', '32')}", "train.max_steps=25",
                              "train.log_every=1", "data.num_workers=0", "train.warmup_steps=2", "train.batch_size=16"],
                             timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    curve = losses(run)
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5, curve
    exported = run_dist_diffusion(["export", "--run-dir", str(run), "--out", str(tmp_path / "vae-export")], timeout=300)
    assert exported.returncode == 0 and "AutoencoderKL" in exported.stdout, exported.stderr
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tmp_path / "vae-export")
    assert vae.config.latent_channels == 4
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == 4  # measured by the export
    measured = json.loads((run / "heldout_metrics.json").read_text())
    assert measured["reconstruction"]["psnr_db"] > 0 and measured["latent_stats"]["num_images"] > 0
    assert json.loads((tmp_path / "vae-export/dist_diffusion.json").read_text())["reconstruction"] == \
        measured["reconstruction"]
    encoded = run_dist_diffusion(["encode", "--shards",
                                  datasets["pixels"].replace("16", "32"), "--out", "s3://train-data/lat-own-vae",
                                  "--config", "configs/tiny.yaml", f"vae.pretrained={tmp_path / 'vae-export'}"],
                                 timeout=300)
    assert encoded.returncode == 0 and "latents 4x8x8" in encoded.stdout, encoded.stderr
    from dist_diffusion.data.shards import load_manifest

    stats = load_manifest("s3://train-data/lat-own-vae")["latent_stats"]
    assert abs(stats["std"] - 1) < 0.1 and all(abs(s - 1) < 0.1 for s in stats["channel_std"])


def test_an_adversarial_vae_trains_its_discriminator_on_two_ranks_and_exports_the_vae_alone(tmp_path, datasets):
    run = tmp_path / "vae-gan"
    run_train(run, [f"data.shards={datasets['pixels'].replace('16', '32')}", "train.target=vae",
                    "vae.adversarial_weight=0.5", "train.max_steps=4", "train.batch_size=16", "train.log_every=1",
                    "train.warmup_steps=2"])
    assert len(losses(run)) == 4 and all(torch.isfinite(torch.tensor(losses(run))))
    ema = load_file(str(run / "checkpoints/step00000004/ema_rank000.safetensors"))
    assert any(key.startswith("discriminator.") for key in ema), sorted(ema)[:5]  # trained and kept for resume
    out = run_dist_diffusion(["export", "--run-dir", str(run), "--out", str(tmp_path / "export")], timeout=300)
    assert out.returncode == 0 and "AutoencoderKL" in out.stdout, out.stderr[-3000:]
    weights = load_file(str(tmp_path / "export/diffusion_pytorch_model.safetensors"))
    assert not any("discriminator" in key for key in weights) and "decoder.conv_out.weight" in weights


def test_checkpoints_upload_to_s3_and_a_fresh_run_dir_resumes_from_there(tmp_path, datasets):
    from dist_diffusion.data import storage

    storage.s3_client().create_bucket(Bucket="ckpts")
    args = PIXEL + ["train.ckpt_every=3", f"data.shards={datasets['pixels']}", "train.ckpt_url=s3://ckpts/run1"]
    run_train(tmp_path / "first", args + ["train.max_steps=3"])
    names = storage.list_names(storage.parse("s3://ckpts/run1"))
    assert "step00000003/COMPLETE" in names and "step00000003/ema_rank000.safetensors" in names
    assert "step00000003/ema_rank001.safetensors" not in names  # ZeRO-2: rank 0's EMA alone
    again = run_train(tmp_path / "elsewhere", args + ["train.max_steps=5"])  # another machine: empty run_dir
    assert "resumed from" in again.stdout and "at step 3" in again.stdout
    assert "step00000005/COMPLETE" in storage.list_names(storage.parse("s3://ckpts/run1"))


def keys_by_step(run_dir):
    """step -> keys every rank consumed at that step (the last record wins after a resume)."""
    latest = {}
    for path in sorted(Path(run_dir).glob("samples_rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            latest[(path.name, row["step"])] = row["keys"]
    out = {}
    for (_, step), keys in latest.items():
        out.setdefault(step, []).extend(keys)
    return out


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_elastic_resume_continues_the_epoch_without_loss_or_repeat(tmp_path, datasets, before, after):
    # 160 samples, global batch 16: one epoch is 10 steps whatever the process count
    args = PIXEL + ["runtime.zero_stage=2", "train.ckpt_every=4", f"data.shards={datasets['pixels']}"]
    run = tmp_path / "run"
    run_train(run, args + ["train.max_steps=4"], nproc=before)
    resumed = run_train(run, args + ["train.max_steps=10"], nproc=after)
    assert f"(written by {before} processes, now {after})" in resumed.stdout
    steps = keys_by_step(run)
    assert sorted(steps) == list(range(1, 11)) and all(len(k) == 16 for k in steps.values())
    epoch = [key for step in range(1, 11) for key in steps[step]]
    assert len(epoch) == len(set(epoch)) == 160  # the whole epoch, each sample once
    assert losses(run)[-1] < losses(run)[0]
