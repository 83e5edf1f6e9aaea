"""One GPU: the framework's training step against a plain-PyTorch ceiling, with MFU.

Run on a machine with CUDA (nothing from the network: shards are synthetic, in a temp dir):
    python bench/gpu_train.py            # prints a table, then name=value figures
Without CUDA it prints `gpu bench skipped: no CUDA` and no figure (CPU CI, `make bench`).
GPU_BENCH_ON_CPU=1 runs every code path on the CPU with the tiny UNet and a few steps: a
smoke check of this script, not a measurement.

Rows (median of 3 rounds of ROUND timed steps after WARMUP, bracketed by synchronize):
- framework: build_run + train_step + EMA, world 1, ZeRO-2, bf16, latent shards,
  data.num_workers=4, at micro-batch 16 (the reference recipe's per-GPU share) and 128;
- plain: the same UNet in bf16 autocast with fused AdamW, inputs already on the GPU, noise
  from a CUDA generator, EMA by _foreach_lerp_; at 16, 128, 256, and at 128 with
  torch.compile and with channels_last;
- components: EMA update, host syncs in one framework step (sync debug mode), a blocking
  checkpoint save, on-the-fly VAE encode of 16 images at 128 px in fp32 and bf16;
- smoke: train() 20 steps from image shards with the VAE on the fly, grids and checkpoints
  at 10, resumed to 30; then evaluate() on 64 samples.
MFU counts the UNet's forward+backward FLOPs (torch.utils.flop_counter on the meta device)
against 989 TFLOP/s (H100 SXM bf16 dense) and against a measured 8192^3 bf16 matmul.
The last line is `gpu_framework_vs_plain_ratio` (framework s/step / plain s/step at 128;
goal <= 1.10). The full table goes to $OUT/gpu_bench.json when OUT is set.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ON_CPU = os.environ.get("GPU_BENCH_ON_CPU") == "1"
WARMUP, ROUND, ROUNDS = (1, 2, 1) if ON_CPU else (15, 30, 3)
PEAK_BF16 = 989e12
RECIPE = "configs/imagenet100_latent.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def where() -> torch.device:
    return torch.device("cpu") if ON_CPU else torch.device("cuda")


def sync() -> None:
    if where().type == "cuda":
        torch.cuda.synchronize()


def timed(step, warmup=WARMUP, steps=ROUND, rounds=ROUNDS) -> float:
    """Median seconds per call of ``step`` over rounds of ``steps`` calls."""
    for _ in range(warmup):
        step()
    per_round = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        per_round.append((time.perf_counter() - start) / steps)
    return statistics.median(per_round)


def recipe(overrides: list[str]):
    from dist_diffusion.config import load_config

    tiny = ["model.preset=tiny", "model.block_out_channels=[]", "model.attention_levels=[]",
            "model.layers_per_block=null", "model.norm_num_groups=null", "model.attention_head_dim=null",
            "data.resolution=32", "vae.block_out_channels=[32,64]", "vae.norm_num_groups=8"] if ON_CPU else []
    return load_config(RECIPE, tiny + overrides)


def environment() -> dict:
    import deepspeed
    import diffusers

    from dist_diffusion.runtime.distributed import nvidia_driver

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
           "diffusers": diffusers.__version__, "driver": nvidia_driver()}
    if where().type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version(),
                   matmul_tflops=matmul_ceiling() / 1e12)
    return env


def matmul_ceiling() -> float:
    """FLOP/s of an 8192^3 bf16 matmul: the practical roof MFU is also quoted against."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds = timed(lambda: a @ a, warmup=3, steps=20, rounds=3)
    return 2 * 8192 ** 3 / seconds


def flops_per_image(cfg) -> float:
    """Forward + backward FLOPs of the UNet for one image, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from dist_diffusion.core.models import build_unet
    from dist_diffusion.config.shapes import unet_input_shape

    with torch.device("meta"):
        unet = build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data))
        x = torch.randn(1, *unet_input_shape(cfg.vae, cfg.data))
        t, y = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, class_labels=y).sample.sum().backward()
    return float(counter.get_total_flops())


def latent_shards(root: Path, cfg, count: int) -> str:
    """Synthetic latent shards (mean/std float16, as `encode` writes) in a local directory."""
    from dist_diffusion.config.shapes import unet_input_shape
    from dist_diffusion.data import shards

    shape, rng, entries = unet_input_shape(cfg.vae, cfg.data), np.random.default_rng(0), []
    out = root / "latents"
    out.mkdir(parents=True)
    per_shard = 512
    for k in range(0, count, per_shard):
        samples = [(f"{i:08d}", {"mean.npy": _npy(rng.standard_normal(shape)), "std.npy": _npy(np.full(shape, 0.1)),
                                 "cls": str(i % cfg.model.num_classes).encode()}) for i in range(k, min(count, k + per_shard))]
        name = shards.shard_name("shard", k // per_shard)
        entries.append({"name": name, **shards.write_tar(out / name, samples)})
    manifest = shards.manifest("latents", [str(c) for c in range(cfg.model.num_classes)], entries,
                               resolution=cfg.data.resolution, latent_shape=list(shape), scaling_factor=1.0)
    (out / shards.MANIFEST).write_bytes(shards.dumps(manifest))
    return str(out)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.astype(np.float16))
    return buf.getvalue()


def framework(root: Path, micro_batch: int, shards_url: str) -> dict:
    """The product's step (data, loss, DeepSpeed, EMA) at one micro-batch size."""
    from dist_diffusion.core.ema import ema_decay
    from dist_diffusion.train import build_run, stream_batches, train_step

    cfg = recipe([f"train.batch_size={micro_batch}", "data.num_workers=4", f"data.shards={shards_url}",
                  f"train.run_dir={root / f'run-mb{micro_batch}'}", "train.log_every=1000000"])
    run = build_run(cfg)
    batches, waited = stream_batches(run), []

    def step():
        m = train_step(run, batches)
        run.state.step += 1
        run.ema.update(ema_decay(run.state.step, 0.9999))
        waited.append(m.get("data_wait_s", 0.0))
    torch.cuda.reset_peak_memory_stats() if where().type == "cuda" else None
    seconds = timed(step)
    row = {"s_per_step": seconds, "img_per_s": micro_batch / seconds,
           "data_wait_fraction": sum(waited[-ROUND:]) / (ROUND * seconds),
           "max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if where().type == "cuda" else None}
    if micro_batch == 16:
        row.update(components(run, batches, root))
    run.logger.close()
    return row


def components(run, batches, root: Path) -> dict:
    from dist_diffusion.runtime import checkpoint
    from dist_diffusion.train import save, train_step

    ema_s = timed(lambda: run.ema.update(0.999), warmup=3, steps=20, rounds=3)
    syncs = count_syncs(lambda: train_step(run, batches))
    sync()
    start = time.perf_counter()
    save(run)
    sync()
    return {"ema_update_ms": 1e3 * ema_s, "host_syncs_per_step": syncs,
            "checkpoint_save_s": time.perf_counter() - start,
            "checkpoint_files": len(list((root / f"run-mb16/checkpoints/{checkpoint.tag_for(run.state.step)}").iterdir()))}


def count_syncs(step) -> int | None:
    """Synchronising CUDA calls in one call of ``step`` (torch's sync debug mode warns once each)."""
    if where().type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def plain(micro_batch: int, compile_model: bool = False, channels_last: bool = False) -> dict:
    """The textbook step: bf16 autocast, fused AdamW, data already on the device, EMA by foreach."""
    from dist_diffusion.core.losses import diffusion_loss
    from dist_diffusion.core.models import as_denoiser, build_unet
    from dist_diffusion.config.shapes import unet_input_shape
    from dist_diffusion.core.schedule import make_schedule

    cfg = recipe([])
    torch.manual_seed(0)
    unet = build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).to(where())
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=where().type == "cuda")
    ema = [p.detach().clone() for p in unet.parameters()]
    net = torch.compile(unet) if compile_model else unet
    schedule = make_schedule(cfg.diffusion.schedule).to(where())
    gen = torch.Generator(device=where()).manual_seed(0)
    x0 = torch.randn(micro_batch, *unet_input_shape(cfg.vae, cfg.data), device=where(), generator=gen)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, cfg.model.num_classes, (micro_batch,), device=where(), generator=gen)

    def step():
        t = torch.randint(0, 1000, (micro_batch,), device=where(), generator=gen)
        noise = torch.randn(x0.shape, device=where(), generator=gen)
        with torch.autocast(where().type, dtype=torch.bfloat16):
            loss = diffusion_loss(as_denoiser(net), schedule, x0, labels, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1e-4)
    seconds = timed(step)
    return {"s_per_step": seconds, "img_per_s": micro_batch / seconds}


def vae_encode_ms() -> dict:
    from dist_diffusion.core.models import build_vae, encode_images

    cfg = recipe([])
    vae = build_vae(cfg.vae, cfg.data).to(where()).eval()
    images = torch.rand(16, 3, cfg.data.resolution, cfg.data.resolution, device=where()) * 2 - 1
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        def encode():
            with torch.no_grad(), torch.autocast(where().type, dtype=dtype or torch.float32, enabled=dtype is not None):
                encode_images(vae, images, sample=False)
        out[f"vae_encode16_{name}_ms"] = 1e3 * timed(encode, warmup=2, steps=5, rounds=3)
    return out


def smoke(root: Path) -> dict:
    """train() on image shards with the VAE on the fly, a grid and a checkpoint mid-run,
    resumed; then evaluate() on 64 samples: catches any device-placement error."""
    from conftest import make_class_folders
    from dist_diffusion.core.models import build_classifier, build_vae
    from dist_diffusion.data.prepare import prepare
    from dist_diffusion.evaluate.sample import evaluate
    from dist_diffusion.export import export_model
    from dist_diffusion.train import train

    base = recipe([])
    make_class_folders(root / "src", classes=4, per_class=40)
    prepare(root / "src", str(root / "img"), base.data, progress=False)
    build_vae(base.vae, base.data).save_pretrained(root / "vae")
    common = [f"data.shards={root / 'img'}", f"vae.pretrained={root / 'vae'}", "model.num_classes=4",
              "train.batch_size=16", "train.sample_every=10", "train.ckpt_every=10", "sample.steps=10",
              f"train.run_dir={root / 'smoke'}", "train.log_every=10", "data.num_workers=2"]
    train(recipe(common + ["train.max_steps=20"]))
    resumed = train(recipe(common + ["train.max_steps=30"]))
    export_model(root / "smoke", root / "unet")
    judged = recipe(["model.num_classes=4"])
    build_classifier(judged.model, judged.data).save_pretrained(root / "classifier")
    rows = evaluate(recipe(common + [f"eval.unet={root / 'unet'}", f"eval.classifier={root / 'classifier'}",
                                     f"eval.out={root / 'eval'}", "sample.num_samples=64", "sample.batch_size=32"]))
    grids = sorted(p.name for p in (root / "smoke/samples").glob("*.png"))
    return {"smoke_resumed_to": resumed["step"], "smoke_grids": grids, "smoke_eval_fid": rows[0].get("fid")}


def main() -> int:
    if not torch.cuda.is_available() and not ON_CPU:
        print("gpu bench skipped: no CUDA")
        return 0
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    cfg = recipe([])
    table = {"environment": environment(), "flops_per_image": flops_per_image(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards_url = latent_shards(root, cfg, 4096 if not ON_CPU else 256)
        for mb in (16, 128):
            table[f"framework_mb{mb}"] = framework(root, mb, shards_url)
        for mb in (16, 128, 256):
            table[f"plain_mb{mb}"] = plain(mb)
        table["plain_mb128_compile"] = plain(128, compile_model=not ON_CPU)
        table["plain_mb128_channels_last"] = plain(128, channels_last=True)
        table.update(vae_encode_ms())
        table.update(smoke(root))
    report(table)
    return 0


def report(table: dict) -> None:
    flops, ceiling = table["flops_per_image"], table["environment"].get("matmul_tflops")
    for name, row in table.items():
        if isinstance(row, dict) and "img_per_s" in row:
            row["mfu_pct"] = 100 * row["img_per_s"] * flops / PEAK_BF16
            row["mfu_of_measured_matmul_pct"] = 100 * row["img_per_s"] * flops / (ceiling * 1e12) if ceiling else None
    text = json.dumps(table, indent=2, default=str)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_bench.json").write_text(text)
    fw, pl = table["framework_mb128"], table["plain_mb128"]
    print(f"gpu_train_img_per_s_mb16={table['framework_mb16']['img_per_s']:.1f}")
    print(f"gpu_train_img_per_s_mb128={fw['img_per_s']:.1f}")
    print(f"gpu_plain_img_per_s_mb128={pl['img_per_s']:.1f}")
    print(f"gpu_mfu_pct_mb128={fw['mfu_pct']:.2f}")
    print(f"gpu_framework_vs_plain_ratio={fw['s_per_step'] / pl['s_per_step']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
