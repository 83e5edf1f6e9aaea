"""``train(cfg)``: the training job every launcher calls (local, torchrun, SLURM, Ray).

A short driver of named steps: join the process group, build the pieces, restore the
latest complete checkpoint of the run directory, then loop: next batch -> loss ->
DeepSpeed step -> EMA -> log -> checkpoint / sample grid / preemption check.
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import Config, DataConfig, RuntimeConfig, TrainConfig, VAEConfig, derive, to_yaml
from ..core.ema import ema_decay
from ..core.models import build_vae, encode_images
from ..core.processes import make_process
from ..data import storage
from ..data.stream import Position, ShardStream, StreamSpec
from ..runtime import checkpoint, run_lock
from ..runtime.distributed import any_rank, describe, device, init_process_group, max_each_over_ranks, placement
from ..runtime.background import BUSY, FAILED, IDLE, BackgroundWriter, install_background_engine
from ..runtime.ema import EngineEMA
from ..errors import TrainingStopped, write_refused
from ..runtime.hardware import choose_precision
from ..runtime.engine import apply_numerics, build_engine, engine_checks_overflow, micro_batch_size
from ..runtime.preemption import (NO_STOP, PREEMPTED, REQUEUE_EXIT_CODE, StopRequests, ignore_stop_signals,
                                  mark_requeue, stop_exception)
from .checks import preflight
from .grids import TrainingGrids
from .log import TrainLogger
from .objectives import Objective, objective
from .state import TrainState, find_resume_tag

@dataclass
class Run:
    """Everything the loop touches, built once: the sections it reads, not the whole tree."""

    train: TrainConfig
    runtime: RuntimeConfig
    data: DataConfig
    vae_cfg: VAEConfig
    objective: Objective
    env: object
    engine: object
    ema: EngineEMA
    process: object  # the forward process (core.processes), on the device
    vae: object
    spec: StreamSpec
    manifest: dict
    logger: TrainLogger
    grids: TrainingGrids
    state: TrainState = field(default_factory=TrainState)
    resume_tag: str | None = None
    elastic: bool = False  # the resume checkpoint was written by another number of processes
    on_checkpoint: Callable[[int, Path], None] | None = None
    clock: Callable[[], float] = time.monotonic  # for train.ckpt_every_minutes
    last_save: float = 0.0  # clock() at the last checkpoint (or the loop's start)
    writer: BackgroundWriter | None = None  # train.background_checkpoints
    pending: Pending | None = None  # a checkpoint written in the background, not yet complete


@dataclass
class Pending:
    """A background checkpoint on its way: ``writing`` its files, then (with
    train.ckpt_url) ``uploading`` them; complete locally once the writing ended everywhere."""

    folder: Path
    step: int
    meta: dict  # what COMPLETE records
    stage: str = "writing"


def train(cfg: Config, on_checkpoint: Callable[[int, Path], None] | None = None) -> dict:
    """Train to cfg.train.max_steps, resuming from the run directory; returns a summary.

    ``on_checkpoint(step, folder)`` runs on every rank after each complete checkpoint
    (the Ray launcher hands the folder to Ray Train's storage there)."""
    # first: a signal during start-up is remembered, and the loader's workers inherit the handlers
    stops = StopRequests(cfg.train.preempt_signals, cfg.train.wall_time_limit_s)
    try:
        run = build_run(cfg)
        run.on_checkpoint = on_checkpoint
        restore(run)
        run.logger.start(run.state.step)
        batches = stream_batches(run)
        try:
            _loop(run, batches, stops)
            finish_pending(run)
        finally:
            batches.close()  # the loader's workers and downloads end here, not at interpreter exit
            run.logger.close()  # the progress bar ends its line before an error's one line
    finally:
        stops.close()
    return {"step": run.state.step, "skipped_steps": run.state.skipped_steps, "run_dir": cfg.train.run_dir}


def _loop(run: Run, batches, stops: StopRequests) -> None:
    """Steps until max_steps; after a stop request, saves and raises Preempted or Interrupted."""
    t, state = run.train, run.state
    run.last_save = run.clock()
    # a Ctrl-C or SIGTERM while the run was starting: step 0, or the checkpoint it resumed from
    _stop_if_asked(run, stops, saved=True)
    while state.step < t.max_steps:
        metrics = train_step(run, batches)
        state.step += 1
        run.ema.update(ema_decay(state.step - 1, t.ema_decay, t.ema_half_life_steps, t.ema_warmup), state.step)
        run.logger.step(state.step, metrics)
        saved = state.step % t.ckpt_every == 0 or state.step == t.max_steps
        if saved:
            save(run)
        if t.sample_every and state.step % t.sample_every == 0 and run.objective.draws_grids:
            grid = run.grids.draw(state.step, run.ema)
            if grid:
                run.logger.grid(state.step, grid)
        # a collective: every N steps (and beside a save), not every step, so GPUs never idle on it
        if saved or state.step % t.preempt_check_every == 0:
            _stop_if_asked(run, stops, saved)


def _stop_if_asked(run: Run, stops: StopRequests, saved: bool) -> None:
    """Every rank agrees, in one collective, on whether (and why) to stop and whether a timed
    checkpoint is due (any rank's clock decides for all, so they never disagree); then saves,
    and raises Preempted or Interrupted."""
    writing = run.writer.status() if run.writer is not None else IDLE
    reason, due, writing = max_each_over_ranks([stops.reason(), int(_timed_checkpoint_due(run)), writing])
    _advance_pending(run, writing)
    if due and not saved:
        save(run)
        saved = True
    if reason == NO_STOP:
        return
    step = run.state.step
    if not saved:
        save(run)
    finish_pending(run)  # what was saved is complete before the process ends
    if reason == PREEMPTED:
        mark_requeue(Path(run.train.run_dir), step, run.env.is_main)
        run.logger.info(f"preempted at step {step}: checkpoint saved, exiting {REQUEUE_EXIT_CODE}")
    else:
        kept = f"checkpoint of step {step} saved" if step > 0 else "nothing trained yet, nothing to save"
        run.logger.info(f"stopped by Ctrl-C at step {step} ({kept}); rerun the same command to resume")
    raise stop_exception(reason)


def _timed_checkpoint_due(run: Run) -> bool:
    minutes = run.train.ckpt_every_minutes
    return minutes > 0 and run.clock() - run.last_save >= 60 * minutes


def build_run(cfg: Config) -> Run:
    storage.configure(cfg.s3)  # every launcher's rank comes through here
    # the launchers checked already; a rank started by torchrun, srun or by hand did not
    manifest = preflight(cfg, check_lock=False)  # the lock is taken below, once the group formed
    env = init_process_group(cfg.runtime.device, cfg.launch.gpus_per_worker > 0, cfg.runtime.socket_ifname,
                             cfg.runtime.rendezvous_timeout_s)
    precision = choose_precision(cfg.runtime.precision, device())
    cfg = derive(cfg, {"runtime.precision": precision.precision}, "runtime.precision resolved for this device")
    run_dir = Path(cfg.train.run_dir)
    run_lock.hold(run_dir, env.is_main)  # before anything in the run directory changes
    resume = find_resume_tag(cfg.train.run_dir, cfg.train.ckpt_url, env.local_rank)
    elastic = resume is not None and checkpoint.saved_world_size(run_dir / "checkpoints", resume) != env.world_size
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    goal = objective(cfg)
    trainable = apply_numerics(cfg.runtime, goal.build().train().to(device()), device())
    engine = build_engine(cfg.train, cfg.runtime, trainable, env.world_size, run_dir, load_universal=elastic)
    writer = BackgroundWriter() if cfg.train.background_checkpoints else None
    if writer is not None:
        install_background_engine(engine, writer)
    vae = _frozen_vae(cfg.vae, cfg.data) if goal.encodes_with_vae(manifest["kind"]) else None
    spec = StreamSpec(url=cfg.data.shards, batch_size=micro_batch_size(cfg.train, env.world_size), rank=env.rank,
                      world_size=env.world_size, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                      hflip=cfg.data.hflip, max_corrupt_fraction=cfg.data.max_corrupt_fraction,
                      resolution=cfg.data.resolution, crop=cfg.data.crop)
    if env.is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    _record_placement(run_dir, env)
    logger = TrainLogger(cfg.train, env, run_dir, cfg.log, dataclasses.asdict(cfg))
    logger.info(describe(env))
    logger.info(f"training in {precision.precision}: {precision.reason}")
    if precision.warning:
        logger.warning(precision.warning)
    process = make_process(cfg.diffusion).to(device())
    grids = TrainingGrids(goal, cfg.sample, cfg.diffusion, run_dir, env.is_main, vae)
    ema = EngineEMA(engine, cfg.runtime.zero_stage, tuple(cfg.train.ema.posthoc_sigma_rels))
    return Run(cfg.train, cfg.runtime, cfg.data, cfg.vae, goal, env, engine, ema, process, vae, spec, manifest, logger,
               grids, resume_tag=resume, elastic=elastic, writer=writer)


def _record_placement(run_dir: Path, env) -> None:
    """Each rank notes its host, address, interface and CPUs: which node ran what, after the fact."""
    hosts = run_dir / "hosts"
    hosts.mkdir(parents=True, exist_ok=True)
    (hosts / f"rank{env.rank:03d}.json").write_text(json.dumps(placement(env)) + "\n")


def _frozen_vae(v: VAEConfig, data: DataConfig):
    return build_vae(v, data).to(device()).eval().requires_grad_(False)


def stream_batches(run: Run):
    """Micro-batches forever from one DataLoader whose workers walk epoch after epoch (they
    stay alive and keep prefetching across epoch ends). ``run.state.position`` counts what the
    loop consumed (not what the workers prefetched), so a checkpoint taken between steps
    resumes exactly."""
    state = run.state
    start = Position(state.position.epoch, state.position.batches, state.position.remaining)
    loader = torch.utils.data.DataLoader(ShardStream(run.spec, start, run.manifest, epochs=None), batch_size=None,
                                         num_workers=run.spec.num_workers, pin_memory=device().type == "cuda",
                                         worker_init_fn=partial(ignore_stop_signals, run.train.preempt_signals))
    for batch in loader:
        if batch["epoch"] != state.position.epoch:
            state.position = Position(batch["epoch"], 0)
        state.position.batches += 1
        yield batch


def train_step(run: Run, batches) -> dict:
    """One optimizer step over grad_accum micro-batches; returns metrics for the logger.

    Nothing here waits for the GPU: losses, noise levels and the grad norm stay on the device
    (the logger copies them at log steps), and a non-finite step is found by DeepSpeed's
    own overflow check, read once per step from ``was_step_applied``."""
    waited, losses, levels, keys, corrupt = 0.0, [], [], [], 0
    for micro in range(run.train.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t0
        corrupt += batch.get("corrupt", 0)
        real = len(batch["key"])  # samples not corrupt; 0: every one was (a short batch: the epoch's end)
        batch = _padded(batch if real else _stand_in(run), run.spec.batch_size)
        gen = _step_generator(run.train.seed, run.state.step, micro, run.env.rank)
        per_sample, level = _micro_loss(run, batch, gen)
        loss = _mean_of_real(per_sample, real)
        if not engine_checks_overflow(run.runtime) and any_rank(not torch.isfinite(loss).item()):
            return _nonfinite(run, loss)
        run.engine.backward(loss)
        run.engine.step()
        if micro == run.train.grad_accum - 1 and engine_checks_overflow(run.runtime) and not run.engine.was_step_applied():
            return _nonfinite(run, loss)  # every rank saw the same reduced overflow flag
        if real:
            losses.append(per_sample[:real].detach().float())
            levels.append(level[:real] if level is not None else torch.full_like(losses[-1], -1.0))
            keys += batch["key"]
    if not losses:
        losses, levels = [torch.zeros(0, device=device())], [torch.zeros(0, device=device())]
    return {"per_sample": torch.cat(losses), "noise_level": torch.cat(levels), "keys": keys,
            "data_wait_s": waited, "grad_norm": run.engine.get_global_grad_norm(),
            "lr": run.engine.get_lr()[0], "corrupt_samples": corrupt}


def _padded(batch: dict, size: int) -> dict:
    """``batch`` with all-zero samples appended up to the micro-batch size (their loss weight
    is 0, see _mean_of_real): every micro-batch has one shape, so runtime.compile never
    recompiles and cuDNN never re-tunes for a short epoch-end batch or a corrupt sample."""
    short = size - batch["label"].shape[0]
    if short <= 0:
        return batch
    return {name: torch.cat([value, value.new_zeros(short, *value.shape[1:])]) if torch.is_tensor(value) else value
            for name, value in batch.items()}


def _mean_of_real(per_sample: torch.Tensor, real: int) -> torch.Tensor:
    """The loss of a padded micro-batch: the mean over its ``real`` samples; 0 x the mean when
    none is (the rank still runs backward and joins the step's collectives)."""
    if real == per_sample.shape[0]:
        return per_sample.mean()
    return per_sample[:real].mean() if real else per_sample.mean() * 0.0


def _stand_in(run: Run) -> dict:
    """One all-zero sample (padded to the micro-batch) in place of a micro-batch whose every
    sample was corrupt. The rank runs forward and backward on it with loss weight 0, so it
    joins every collective of the step (ZeRO's gradient reduction) like the other ranks and
    adds nothing to the gradient: the ranks stay in step without an extra collective to agree
    on a skip."""
    if run.manifest["kind"] == "latents":
        return {"latent": torch.zeros(1, *run.manifest["latent_shape"]), "label": torch.zeros(1, dtype=torch.long),
                "key": []}
    side = run.data.resolution
    return {"image": torch.zeros(1, run.data.image_channels, side, side), "label": torch.zeros(1, dtype=torch.long),
            "key": []}


def _micro_loss(run: Run, batch: dict, gen: torch.Generator):
    """Per-sample loss of one micro-batch, and its noise levels (None outside diffusion)."""
    x0 = model_inputs(run, batch, gen)
    labels = batch["label"].to(x0.device, non_blocking=True)
    return run.objective.loss(run.engine, run.process, x0, labels, gen)


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """All random draws of a micro-step come from (seed, step, micro, rank): resuming needs
    no RNG state, and the draws do not depend on what ran before."""
    mixed = int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, np.uint64)[0])
    torch.manual_seed(mixed)  # model-internal randomness (dropout) as well
    return torch.Generator().manual_seed(mixed)


def model_inputs(run: Run, batch: dict, gen: torch.Generator) -> torch.Tensor:
    """Latents from latent shards, VAE-encoded images, or the images themselves (pixels)."""
    if "latent" in batch:
        return _memory_format(run, batch["latent"].to(device(), non_blocking=True))
    images = batch["image"].to(device(), non_blocking=True)
    if run.vae is None:
        return _memory_format(run, images)
    with torch.no_grad():
        seeds = torch.randint(2**62, (images.shape[0],), generator=gen).tolist()  # CPU draws: no sync
        noise_gen = [torch.Generator(device=images.device).manual_seed(s) for s in seeds]
        latents = encode_images(run.vae, images, sample=run.vae_cfg.sample_posterior, generator=noise_gen)
    return _memory_format(run, latents)


def _memory_format(run: Run, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if run.runtime.channels_last else x


def _nonfinite(run: Run, loss: torch.Tensor) -> dict:
    """A step whose loss or gradients were not finite was not applied: count it or stop."""
    if run.train.nan_policy == "skip":
        run.state.skipped_steps += 1
        run.logger.info(f"non-finite loss or gradients at step {run.state.step + 1}: step skipped "
                        f"({run.state.skipped_steps} so far)")
        return {"nonfinite_skipped": True}
    raise TrainingStopped(f"loss became {loss.item()} (or its gradients non-finite) at step {run.state.step + 1}; "
                          f"the last complete checkpoint is kept. Lower train.lr, check the data, or set "
                          f"train.nan_policy=skip")


def save(run: Run) -> None:
    """Checkpoint this step: complete before it returns, or (train.background_checkpoints)
    written from host copies while the next steps run. The last step's always completes
    here. A pending checkpoint completes before its successor starts."""
    meta = {"world_size": run.env.world_size, "zero_stage": run.runtime.zero_stage}
    root = Path(run.train.run_dir) / "checkpoints"
    run.logger.flush_samples()  # the record of the steps this checkpoint holds
    finish_pending(run)
    try:
        folder = run.state.save(run.engine, run.ema, root, run.spec, run.train.keep_last, meta, run.writer)
    except Exception as err:
        raise _refused(run, err, root, checkpoint.tag_for(run.state.step)) from None
    run.last_save = run.clock()
    if run.writer is None:
        run.logger.info(f"checkpoint {folder} complete")
        if run.train.ckpt_url:
            checkpoint.upload(root, folder.name, run.train.ckpt_url, run.env.rank, run.env.world_size)
            run.logger.info(f"checkpoint uploaded to {run.train.ckpt_url}/{folder.name}")
        _report(run, folder)
        return
    run.pending = Pending(folder, run.state.step, meta)
    if run.state.step == run.train.max_steps:
        finish_pending(run)


def _refused(run: Run, err: BaseException, root: Path, tag: str) -> BaseException:
    """A write the disk refused, as one line that says what is kept; any other error as it is."""
    last = checkpoint.latest_complete(root)
    refused = write_refused(err, root / tag, "the checkpoint",
                            f"it is not marked complete, and the last complete checkpoint, "
                            f"{root / last if last else 'none yet'}, stays the resume point: rerun the same "
                            f"command once there is room")
    return err if refused is None else refused


def _report(run: Run, folder: Path) -> None:
    """After a checkpoint completed (every rank): its post-hoc EMA snapshot when one is due,
    then the launcher's callback."""
    step = int(folder.name.removeprefix("step"))
    every = run.train.ema.snapshot_every
    if run.ema.sigma_rels and (every == 0 or step % every == 0):
        meta = {"world_size": run.env.world_size, "zero_stage": run.runtime.zero_stage}
        snapshot = checkpoint.save_snapshot(folder.parent, folder, step, run.ema, meta)
        run.logger.info(f"post-hoc EMA snapshot {snapshot}")
    if run.on_checkpoint is not None:
        run.on_checkpoint(int(folder.name.removeprefix("step")), folder)


def finish_pending(run: Run) -> None:
    """Wait for this rank's writer, agree with the others, and complete the pending
    checkpoint (every rank calls it at the same step)."""
    while run.pending is not None:
        try:
            run.writer.wait()
        except Exception:
            pass  # the writer's status is FAILED now: raised below, on every rank at once
        _advance_pending(run, max_each_over_ranks([run.writer.status()])[0])


def _advance_pending(run: Run, writing: int) -> None:
    """One stage of the pending checkpoint, once every rank's writer is idle (``writing``: the
    maximum of their statuses)."""
    if run.pending is None or writing == BUSY:
        return
    pending, root = run.pending, Path(run.train.run_dir) / "checkpoints"
    if writing == FAILED:
        run.pending = None
        err = run.writer.error or TrainingStopped(f"another rank could not write checkpoint {pending.folder}; "
                                                  f"its error is in that rank's log")
        raise _refused(run, err, root, pending.folder.name) from None
    if pending.stage == "uploading":
        checkpoint.upload_marker(root, pending.folder.name, run.train.ckpt_url, run.env.rank)
        run.logger.info(f"checkpoint uploaded to {run.train.ckpt_url}/{pending.folder.name}")
        run.pending = None
        return
    checkpoint.mark_complete(root, pending.folder, pending.step, run.train.keep_last, pending.meta)
    run.logger.info(f"checkpoint {pending.folder} complete")
    _report(run, pending.folder)
    run.pending = None
    if run.train.ckpt_url:  # the files in the background too; COMPLETE goes up once every share did
        url, env = run.train.ckpt_url, run.env
        run.writer.submit(lambda: checkpoint.upload_share(root, pending.folder.name, url, env.rank, env.world_size))
        run.pending = Pending(pending.folder, pending.step, pending.meta, "uploading")


def restore(run: Run) -> None:
    if run.resume_tag is None:
        return
    root = Path(run.train.run_dir) / "checkpoints"
    run.state, writers = TrainState.restore(run.engine, run.ema, root, run.resume_tag, run.spec, run.manifest,
                                            run.elastic)
    how = f" (written by {writers} processes, now {run.env.world_size})" if run.elastic else ""
    run.logger.info(f"resumed from {root / run.resume_tag} at step {run.state.step}{how}")
