"""The rules a config must obey: each field's range and choices (from its metadata in
the schema), then the rules that span sections. Loading calls :func:`validate` on every
tree it builds, so every command sees one error listing every problem."""

from __future__ import annotations

import dataclasses
from typing import Any, List

from .registry import PROCESSES, SAMPLERS, samplers_of
from .schema import (TRACKERS, Config, ConfigError, DiffusionConfig, EvalConfig, LogConfig, SampleConfig,
                     TrainConfig, _most_steps, parse_sampler_entry)
from .shapes import latent_downsample, pretrained_vae_config


def validate(cfg: Config, source: str = "config") -> None:
    """Check every range and choice, then the rules that span sections."""
    problems = list(_field_problems(cfg, prefix=""))
    problems += _cross_problems(cfg)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def _field_problems(node: Any, prefix: str):
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _field_problems(value, prefix=f"{key}.")
            continue
        problem = _check_value(value, f.metadata)
        if problem:
            yield f"{key}={value!r} {problem}"


def _check_value(value: Any, meta: dict) -> str | None:
    if value is None:
        return None
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"is not one of {list(meta['choices'])}"
    bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for name, ok, sign in bounds:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            return f"must be {sign} {bound}"
    return None


def _cross_problems(cfg: Config) -> List[str]:
    problems = []
    m, d, s = cfg.model, cfg.diffusion, cfg.sample
    if len(m.attention_levels) != len(m.block_out_channels):
        problems.append(f"model.attention_levels has {len(m.attention_levels)} entries but "
                        f"model.block_out_channels has {len(m.block_out_channels)}; give one per level")
    for ch in m.block_out_channels:
        if m.norm_num_groups and ch % m.norm_num_groups:
            problems.append(f"model.block_out_channels entry {ch} is not divisible by "
                            f"model.norm_num_groups={m.norm_num_groups}")
    most = _most_steps(s.sampler, d.num_train_timesteps) if s.sampler in SAMPLERS else s.steps
    if s.steps > most:
        problems.append(f"sample.steps={s.steps} must be <= {most} for sample.sampler={s.sampler} "
                        f"(diffusion.num_train_timesteps={d.num_train_timesteps})")
    problems += _process_problems(d, s, cfg.eval)
    problems += _sweep_problems(cfg)
    problems += _signal_problems(cfg.train.preempt_signals)
    problems += _interval_problems(s.guidance_interval, d.num_train_timesteps)
    problems += _beside_training_problems(cfg.eval, cfg.log)
    problems += _posthoc_problems(cfg.train, cfg.eval)
    if cfg.runtime.device == "cpu" and cfg.launch.gpus_per_worker > 0:
        problems.append(f"runtime.device=cpu but launch.gpus_per_worker={cfg.launch.gpus_per_worker}; "
                        f"set one of them to match the other")
    if cfg.launch.gpus_per_worker > 1:  # each rank binds cuda:LOCAL_RANK: the other GPUs would idle, or
        # (under Ray) be another worker's
        problems.append(f"launch.gpus_per_worker={cfg.launch.gpus_per_worker}: each process drives one GPU; "
                        f"set launch.gpus_per_worker=1 and raise launch.workers_per_node to use more GPUs")
    if cfg.data.resolution % latent_downsample(cfg.vae):
        problems.append(f"data.resolution={cfg.data.resolution} must be divisible by the VAE "
                        f"downsampling factor {latent_downsample(cfg.vae)}")
    pretrained_channels = pretrained_vae_config(cfg.vae.pretrained).get("latent_channels")
    if pretrained_channels not in (None, cfg.vae.latent_channels):
        problems.append(f"vae.latent_channels={cfg.vae.latent_channels} but the VAE in {cfg.vae.pretrained} has "
                        f"{pretrained_channels}; set vae.latent_channels to match")
    return problems


def _sweep_problems(cfg: Config) -> List[str]:
    """The eval sweeps obey the bounds of the single value they sweep: found
    here, not after the job already sampled the points before a bad one."""
    problems = []
    if any(scale < 0 for scale in cfg.eval.guidance_scales):
        problems.append(f"eval.guidance_scales={list(cfg.eval.guidance_scales)}: every scale must be >= 0")
    T = cfg.diffusion.num_train_timesteps
    try:
        pinned = [parse_sampler_entry(entry) for entry in cfg.eval.samplers or [cfg.sample.sampler]]
    except ValueError as err:
        return problems + [f"eval.samplers={list(cfg.eval.samplers)}: {err}"]
    for name, steps in pinned:
        most = _most_steps(name, T)
        if steps is not None and not 1 <= steps <= most:
            problems.append(f"eval.samplers entry {name}:{steps}: {name} takes 1..{most} steps")
        elif steps is None and any(not 1 <= n <= most for n in cfg.eval.steps):
            problems.append(f"eval.steps={list(cfg.eval.steps)}: every step count must be in 1..{most} "
                            f"(diffusion.num_train_timesteps{', less 1 for ' + name if most < T else ''})")
    return list(dict.fromkeys(problems))


def _process_problems(d: DiffusionConfig, s: SampleConfig, e: EvalConfig) -> List[str]:
    """The forward process's own rules (its registry entry's), and samplers that integrate
    it: a sampler of another process would read the network's output as what it is not."""
    process = PROCESSES.get(d.process)
    if process is None:
        return []  # the field check names the unknown process
    problems, fits = list(process.rules(d)), list(samplers_of(d.process))
    named = [("sample.sampler", s.sampler)] + [("eval.samplers entry", str(x).partition(":")[0]) for x in e.samplers]
    for key, name in named:
        if name in SAMPLERS and name not in fits:
            problems.append(f"{key} {name} samples the {SAMPLERS[name].process} process, not "
                            f"diffusion.process={d.process}: choose one of {fits}")
    return problems


def _signal_problems(names: List[str]) -> List[str]:
    import signal

    bad = [n for n in names if not n.startswith("SIG") or not isinstance(getattr(signal, n, None), signal.Signals)
           or n in ("SIGKILL", "SIGSTOP")]
    if bad:
        return [f"train.preempt_signals has {bad}: name signals a process can catch, e.g. SIGTERM, SIGUSR1"]
    return []


def _interval_problems(interval: List[int], num_timesteps: int) -> List[str]:
    if not interval:
        return []
    if len(interval) != 2 or not 0 <= interval[0] <= interval[1] < num_timesteps:
        return [f"sample.guidance_interval={list(interval)} must be [lo, hi] with "
                f"0 <= lo <= hi < T={num_timesteps}"]
    return []


def _beside_training_problems(e: EvalConfig, log: LogConfig) -> List[str]:
    """Evaluation during training has figures to plot; trackers are named ones."""
    problems = []
    unknown = [name for name in log.trackers if name not in TRACKERS]
    if unknown:
        problems.append(f"log.trackers has {unknown}: choose from {TRACKERS}")
    if e.during_training and not e.metrics:
        problems.append("eval.during_training needs eval.metrics=true: the curve and the best step are its figures")
    return problems


def _posthoc_problems(t: TrainConfig, e: EvalConfig) -> List[str]:
    """Profiles of a width a power function can have; snapshots that ride checkpoints."""
    problems = []
    for key, widths in (("train.ema.posthoc_sigma_rels", t.ema.posthoc_sigma_rels),
                        ("eval.ema_sigma_rels", e.ema_sigma_rels)):
        bad = [s for s in widths if not 0 < s < 0.289]
        if bad:
            problems.append(f"{key} has {bad}: each must be in (0, 0.289) (EDM2 tracks 0.05 and 0.10)")
    if len(set(t.ema.posthoc_sigma_rels)) != len(t.ema.posthoc_sigma_rels):
        problems.append(f"train.ema.posthoc_sigma_rels={list(t.ema.posthoc_sigma_rels)} repeats a width")
    if t.ema.snapshot_every % t.ckpt_every:
        problems.append(f"train.ema.snapshot_every={t.ema.snapshot_every} must be a multiple of train.ckpt_every="
                        f"{t.ckpt_every}: a snapshot is taken with a checkpoint")
    return problems
