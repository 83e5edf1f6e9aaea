"""One GPU: the framework's training step against the strongest plain-PyTorch loop, with MFU.

Run on a machine with CUDA (nothing from the network: shards are synthetic, in a temp dir):
    python bench/gpu_train.py            # prints a table, then name=value figures
Without CUDA it prints `gpu bench skipped: no CUDA` and no figure (CPU CI, `make bench`).
GPU_BENCH_ON_CPU=1 runs every code path on the CPU with the tiny UNet and a few steps: a
smoke check of this script, not a measurement.

Rows (median of 3 rounds of ROUND timed steps after WARMUP, bracketed by synchronize):
- framework: build_run + train_step + EMA, world 1, the recipe's ZeRO stage and precision,
  latent shards, data.num_workers=4, at the recipe's per-GPU micro-batch (its global batch
  over RECIPE_GPUS GPUs: 16) and at 128;
- plain, the strongest single-GPU loop written for this UNet: bf16 weights, fused AdamW,
  channels_last, inputs already on the GPU, noise from a CUDA generator, EMA by
  _foreach_lerp_; eager, compiled, and compiled with CUDA graphs (mode reduce-overhead);
  the fastest of the three is "plain" at each micro-batch;
- components at the recipe's micro-batch: EMA update; host syncs per step counted from a
  profiler trace (cudaDeviceSynchronize, cudaStreamSynchronize, cudaEventSynchronize and
  blocking cudaMemcpy: explicit synchronize() calls included, which torch's sync debug
  mode cannot see); checkpoint cost as the step-time difference between steps that save
  every SAVE_EVERY steps (background writes and the upload to a local train.ckpt_url
  included) and the same steps without saves; on-the-fly VAE encode of 16 images at
  128 px in fp32 and bf16;
- smoke: train() 20 steps from image shards with the VAE on the fly, grids and checkpoints
  at 10, resumed to 30; then evaluate() on 64 samples.
MFU counts the UNet's forward+backward FLOPs (torch.utils.flop_counter on the meta device)
against 989 TFLOP/s (H100 SXM bf16 dense) and against a measured 8192^3 bf16 matmul.
The last line is `gpu_framework_vs_plain_ratio`: framework s/step over plain s/step at the
recipe's micro-batch (goal <= 1.10); `gpu_framework_vs_plain_ratio_mb128` is context. The
full table goes to $OUT/gpu_bench.json when OUT is set; bench/RESULTS.md is where a GPU
run's figures are recorded.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ON_CPU = os.environ.get("GPU_BENCH_ON_CPU") == "1"
WARMUP, ROUND, ROUNDS = (1, 2, 1) if ON_CPU else (15, 30, 3)
PEAK_BF16 = 989e12
RECIPE = "configs/imagenet100_latent.yaml"
RECIPE_GPUS = 8  # the reference run: 8 GPUs share the recipe's global batch
SAVE_EVERY = 5 if ON_CPU else 20
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
                  f"train.run_dir={root / f'run-mb{micro_batch}'}", "train.log_every=1000000",
                  f"train.ckpt_url={root / f'uploaded-mb{micro_batch}'}"])
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
    if micro_batch == recipe_micro_batch():
        row.update(components(run, batches, step, seconds))
    run.logger.close()
    return row


def recipe_micro_batch() -> int:
    cfg = recipe([])
    return cfg.train.batch_size // (RECIPE_GPUS * cfg.train.grad_accum)


def components(run, batches, step, step_s: float) -> dict:
    from dist_diffusion.train import train_step
    from dist_diffusion.train.loop import finish_pending, save

    ema_s = timed(lambda: run.ema.update(0.999), warmup=3, steps=20, rounds=3)
    syncs = count_syncs(lambda: train_step(run, batches))

    def saving_step():
        step()
        if run.state.step % SAVE_EVERY == 0:
            save(run)

    saving_s = timed(saving_step, warmup=SAVE_EVERY, steps=SAVE_EVERY * 2, rounds=ROUNDS)
    finish_pending(run)
    return {"ema_update_ms": 1e3 * ema_s, "host_syncs_per_step": syncs,
            "checkpoint_cost_per_save_s": (saving_s - step_s) * SAVE_EVERY,
            "step_with_saves_vs_without": saving_s / step_s}


SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def count_syncs(step, steps: int = 3) -> float | None:
    """Host-blocking CUDA runtime calls per call of ``step``, from a profiler trace (which sees
    DeepSpeed's explicit synchronize() calls too). None on the CPU."""
    if where().type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    step()  # outside the trace: lazy initialisations
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        for _ in range(steps):
            step()
    return sum(event.name in SYNC_CALLS for event in trace.events()) / steps


PLAIN_VARIANTS = ("eager", "compiled", "cuda_graphs")


def plain(micro_batch: int, variant: str) -> dict:
    """The strongest textbook step: bf16 weights, fused AdamW, channels_last, data already on
    the device, EMA by foreach; ``variant``: eager, compiled, or compiled with CUDA graphs."""
    from dist_diffusion.core.losses import diffusion_loss
    from dist_diffusion.core.models import build_unet
    from dist_diffusion.config.shapes import unet_input_shape
    from dist_diffusion.core.schedule import make_schedule

    cfg = recipe([])
    torch.manual_seed(0)
    shape = unet_input_shape(cfg.vae, cfg.data)
    unet = build_unet(cfg.model, shape).to(where(), torch.bfloat16).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=where().type == "cuda")
    ema = [p.detach().float().clone() for p in unet.parameters()]
    net = unet
    if variant != "eager" and not ON_CPU:  # compiling on the CPU smoke run would take minutes
        net = torch.compile(unet, mode="reduce-overhead" if variant == "cuda_graphs" else None)
    schedule = make_schedule(cfg.diffusion.schedule).to(where())
    gen = torch.Generator(device=where()).manual_seed(0)
    x0 = torch.randn(micro_batch, *shape, device=where(), generator=gen)
    labels = torch.randint(0, cfg.model.num_classes, (micro_batch,), device=where(), generator=gen)

    def denoise(x, t, y):  # the network in bf16 and NHWC; the loss in fp32
        return net(x.to(torch.bfloat16, memory_format=torch.channels_last), t, class_labels=y).sample.float()

    def step():
        t = torch.randint(0, 1000, (micro_batch,), device=where(), generator=gen)
        noise = torch.randn(x0.shape, device=where(), generator=gen)
        loss = diffusion_loss(denoise, schedule, x0, labels, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        torch._foreach_lerp_(ema, [p.detach().float() for p in unet.parameters()], 1e-4)
    seconds = timed(step)
    return {"s_per_step": seconds, "img_per_s": micro_batch / seconds, "variant": variant}


def strongest_plain(micro_batch: int, table: dict) -> dict:
    """Every variant into the table; the fastest is the baseline."""
    rows = [plain(micro_batch, variant) for variant in PLAIN_VARIANTS]
    for row in rows:
        table[f"plain_mb{micro_batch}_{row['variant']}"] = row
    return min(rows, key=lambda row: row["s_per_step"])


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
        sizes = (recipe_micro_batch(), 128)
        for mb in sizes:
            table[f"framework_mb{mb}"] = framework(root, mb, shards_url)
            table[f"plain_mb{mb}"] = strongest_plain(mb, table)
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
    mb = recipe_micro_batch()
    fw, pl = table[f"framework_mb{mb}"], table[f"plain_mb{mb}"]
    fw128, pl128 = table["framework_mb128"], table["plain_mb128"]
    print(f"gpu_train_img_per_s_mb{mb}={fw['img_per_s']:.1f}")
    print(f"gpu_train_img_per_s_mb128={fw128['img_per_s']:.1f}")
    print(f"gpu_plain_img_per_s_mb{mb}={pl['img_per_s']:.1f}")
    print(f"gpu_mfu_pct_mb{mb}={fw['mfu_pct']:.2f}")
    print(f"gpu_checkpoint_cost_per_save_s={fw['checkpoint_cost_per_save_s']:.3f}")
    print(f"gpu_framework_vs_plain_ratio_mb128={fw128['s_per_step'] / pl128['s_per_step']:.3f}")
    print(f"gpu_framework_vs_plain_ratio={fw['s_per_step'] / pl['s_per_step']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
