"""The DeepSpeed engine, built from the ``train`` and ``runtime`` sections of the config.
The DeepSpeed JSON is derived here, in one place, and written into the run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import ConfigError, RuntimeConfig, TrainConfig


def micro_batch_size(train: TrainConfig, world_size: int) -> int:
    per_step = world_size * train.grad_accum
    if train.batch_size % per_step:
        raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by world size "
                          f"{world_size} x train.grad_accum={train.grad_accum}; pick a multiple")
    return train.batch_size // per_step


def deepspeed_config(train: TrainConfig, r: RuntimeConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for this run (optimizer and schedule are passed as objects).

    ``check_grad_overflow`` is spelled out because the loop relies on it: ZeRO 1-3 skip a
    step whose gradients hold inf/NaN (the all-reduce they already do), and the loop reads
    ``engine.was_step_applied()`` instead of syncing on the loss every micro-step."""
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(train, world_size),
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": r.precision == "bf16", "check_grad_overflow": True},
        "zero_optimization": {"stage": r.zero_stage, "overlap_comm": r.overlap_comm,
                              "contiguous_gradients": True, "reduce_bucket_size": r.bucket_size,
                              "allgather_bucket_size": r.bucket_size},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronizes the device twice per
        # micro-step (engine.forward -> tput_timer.start, engine.step -> tput_timer.stop); the
        # loop measures images/s itself at log steps
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }


def engine_checks_overflow(runtime: RuntimeConfig) -> bool:
    """Whether DeepSpeed itself skips a step with non-finite gradients (ZeRO 1-3 do, in
    bf16 through check_grad_overflow and in fp32 through the grad-norm check; ZeRO-0
    hands the step to the plain optimizer)."""
    return runtime.zero_stage >= 1


def lr_lambda(train: TrainConfig):
    """Linear warm-up, then constant or cosine decay to 0 at max_steps (multiplier of lr)."""
    warmup, total = train.warmup_steps, train.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_engine(train: TrainConfig, runtime: RuntimeConfig, model: torch.nn.Module, world_size: int,
                 run_dir: Path, load_universal: bool = False):
    """deepspeed.initialize with AdamW + the LR schedule; writes run_dir/deepspeed.json.
    ``load_universal``: the checkpoint to resume was written by another number of ranks."""
    from .distributed import pin_op_build

    pin_op_build()  # a Ray worker gets here without init_process_group's import
    import deepspeed

    ds_config = deepspeed_config(train, runtime, world_size)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if runtime.compile:
        engine.compile()
    return engine


def apply_numerics(runtime: RuntimeConfig, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """TF32, cuDNN autotuning and the memory format, before the engine wraps the model.
    The defaults leave CPU arithmetic exactly as it was (TF32 and cuDNN are GPU-only)."""
    apply_device_numerics(runtime, device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def apply_device_numerics(runtime: RuntimeConfig, device: torch.device) -> None:
    """TF32 (runtime.tf32) and cuDNN autotuning on a GPU, for training and eval alike; nothing
    on the CPU, whose arithmetic stays exactly as it was."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = runtime.tf32
        torch.backends.cudnn.allow_tf32 = runtime.tf32
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv once
