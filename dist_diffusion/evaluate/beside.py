"""Evaluation beside training (``eval.during_training``): a watcher follows a run directory
and evaluates the EMA of each due checkpoint once it is complete, on resources of its own,
while training goes on. Training never waits for it.

Which steps are due is a function of the config alone (:func:`due_steps`: every
``eval.every_checkpoints``-th checkpoint of the ``train.ckpt_every`` schedule, or every
``eval.every_steps`` rounded up to one, and always the last), so a requeued run, or a
preemption checkpoint at an odd step, changes nothing.

Per step, ``RUN/eval/step-NNNNNN/`` holds the EMA export (``unet/``) and what
``dist-diffusion eval`` writes there: sample shards with their features, grids and
``report.json``, written last, which marks the step evaluated. A killed watcher therefore
resumes where it stopped: finished steps are skipped, and a half-evaluated step reuses its
finished shards. A step's figures are the eval job's, the same on any process count.

When several due checkpoints wait, the newest goes first (the freshest figure); an older one
pruned (``train.keep_last``) before its turn is recorded in ``RUN/eval/skipped.json``.

After each step: a row per sweep point in ``RUN/metrics.jsonl`` (``eval/<point>/<figure>``,
keyed by the training step), the trackers (``log.trackers``), ``RUN/eval/curve.png`` (the
figures against step) and ``RUN/eval/best.json`` (the best step by ``eval.best_metric`` of the
sweep's first point; ``dist-diffusion export --best`` exports it).

The watcher ends when the launcher marks training ended (``RUN/eval/TRAINING_ENDED``) and
nothing complete is left, or after ``eval.idle_minutes`` without a new checkpoint; one that a
person started (no launcher to mark the end) also when the last step is evaluated. The evaluation of a step runs as ``dist-diffusion export`` and
``dist-diffusion eval --nproc eval.nproc`` commands: the watcher itself stays free of tensor
math, and a stop signal reaches the command, which stops at a shard boundary.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, EvalConfig, LogConfig, TrainConfig, load_config
from ..logs import get_logger
from ..runtime.checkpoint import COMPLETE, tag_for
from ..runtime.preemption import NO_STOP, StopRequests, stop_exception
from .curve import record_step

LOG = get_logger("watch")
EVAL_DIR = "eval"  # RUN/eval: evaluation/curve.py writes its curve and best step there too
ENDED = "TRAINING_ENDED"  # RUN/eval/TRAINING_ENDED: the launcher's word that no checkpoint will come
REPORT = "report.json"


def due_steps(train: TrainConfig, ev: EvalConfig) -> list[int]:
    """The training steps whose checkpoints are evaluated, ascending; always the last."""
    scheduled = [*range(train.ckpt_every, train.max_steps, train.ckpt_every), train.max_steps]
    if ev.every_steps:
        wanted = range(ev.every_steps, train.max_steps + 1, ev.every_steps)
        due = {next(s for s in scheduled if s >= want) for want in wanted}  # rounded up to a checkpoint
    else:
        due = set(scheduled[ev.every_checkpoints - 1::ev.every_checkpoints])
    return sorted(due | {train.max_steps})


def eval_root(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL_DIR


def step_dir(run_dir: Path, step: int) -> Path:
    return eval_root(run_dir) / f"step-{step:06d}"


def evaluated_steps(run_dir: Path) -> dict[int, dict]:
    """Every step with a report, and the report."""
    found = {}
    for report in sorted(eval_root(run_dir).glob(f"step-*/{REPORT}")):
        found[int(report.parent.name.split("-")[1])] = json.loads(report.read_text())
    return found


@dataclass
class Progress:
    """What the watcher sees in the run directory at one look."""

    due: list[int]
    complete: set[int]  # steps with a complete checkpoint on disk now
    done: set[int]  # evaluated, or recorded as skipped

    def waiting(self) -> list[int]:
        """Due, complete and not done, newest first."""
        return sorted((s for s in self.due if s in self.complete and s not in self.done), reverse=True)

    def lost(self) -> list[int]:
        """Due steps not done whose checkpoints are gone: a newer one is complete, so they were
        written and pruned before their turn."""
        newest = max(self.complete, default=-1)
        return [s for s in self.due if s not in self.done and s not in self.complete and s < newest]

    def finished(self) -> bool:
        """The last step is done, and no older one still on disk waits."""
        return self.due[-1] in self.done and not self.waiting()


def complete_on_disk(run_dir: Path) -> set[int]:
    """The steps whose checkpoints in the run directory are complete now."""
    root = Path(run_dir) / "checkpoints"
    return {int(p.name[4:]) for p in root.glob("step*") if p.name[4:].isdigit() and (p / COMPLETE).is_file()}


def look(run_dir: Path, train: TrainConfig, ev: EvalConfig, complete: set[int]) -> Progress:
    done = set(evaluated_steps(run_dir)) | set(map(int, _skipped(run_dir)))
    return Progress(due_steps(train, ev), complete, done)


def _skipped(run_dir: Path) -> dict[str, str]:
    path = eval_root(run_dir) / "skipped.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def record_skipped(run_dir: Path, step: int, why: str) -> None:
    skipped = {**_skipped(run_dir), str(step): why}
    _write_json(eval_root(run_dir) / "skipped.json", skipped)
    LOG.warning(f"step {step} not evaluated: {why}")


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def run_config(run_dir: Path) -> Config | None:
    """The run's resolved config, once its trainer has written it."""
    path = Path(run_dir) / "config.yaml"
    return load_config(path) if path.is_file() else None


class Watcher:
    """Follows one run directory (see the module's doc); :meth:`run` until training ended."""

    def __init__(self, run_dir: Path, nproc: int | None = None, poll_s: float = 2.0, until_marked: bool = False):
        self.run_dir, self.nproc, self.poll_s = Path(run_dir), nproc, poll_s
        # started by a launcher: the stored config may be the previous attempt's (a resume to
        # more steps rewrites it later), so only the launcher's mark says no step is to come
        self.until_marked = until_marked
        self.last_news = time.monotonic()  # a new complete checkpoint, or the watcher's start
        self.seen_complete: set[int] = set()
        self.stops = StopRequests(["SIGTERM", "SIGUSR1"])
        self.child: subprocess.Popen | None = None
        self.trackers = None  # opened at the first evaluated step, kept for the watcher's life

    def run(self) -> dict:
        """Evaluate until nothing is left to come; returns what was evaluated and skipped."""
        eval_root(self.run_dir).mkdir(parents=True, exist_ok=True)
        with _only_watcher(self.run_dir):
            try:
                while True:
                    cfg = run_config(self.run_dir)  # one look a round: the config, then the checkpoints
                    progress = look(self.run_dir, cfg.train, cfg.eval, self.complete_steps()) if cfg else None
                    if self._finished(progress, cfg.eval.idle_minutes if cfg else None):
                        break
                    self._stop_if_asked()
                    if progress is None or not self._evaluate_next(progress, cfg.train.keep_last, cfg.eval, cfg.log):
                        time.sleep(self.poll_s)
            finally:
                self.stops.close()
                if self.trackers is not None:
                    self.trackers.close()
        return {"evaluated": sorted(evaluated_steps(self.run_dir)), "skipped": _skipped(self.run_dir)}

    def _finished(self, progress: Progress | None, idle_minutes: float | None) -> bool:
        if progress is None:  # the trainer has not written its config yet
            return self._idle_too_long(120.0)
        if progress.complete - self.seen_complete:
            self.seen_complete |= progress.complete
            self.last_news = time.monotonic()
        if self.training_ended() and not progress.waiting() or not self.until_marked and progress.finished():
            return True
        return self._idle_too_long(idle_minutes)

    def complete_steps(self) -> set[int]:
        """The complete checkpoints there are to evaluate: here, those on disk."""
        return complete_on_disk(self.run_dir)

    def training_ended(self) -> bool:
        """Whether the launcher said no further checkpoint will come."""
        return (eval_root(self.run_dir) / ENDED).exists()

    def _idle_too_long(self, minutes: float) -> bool:
        if time.monotonic() - self.last_news < minutes * 60:
            return False
        LOG.warning(f"no new checkpoint in {self.run_dir} for {minutes:g} minutes: the watcher ends (run it "
                    f"again with `dist-diffusion watch --run-dir {self.run_dir}` when training resumes)")
        return True

    def _evaluate_next(self, progress: Progress, keep_last: int, ev: EvalConfig, log: LogConfig) -> bool:
        """Evaluate the newest waiting step; False when none waits."""
        for step in progress.lost():
            record_skipped(self.run_dir, step, f"its checkpoint was pruned before the watcher reached it "
                                               f"(train.keep_last={keep_last})")
        waiting = progress.waiting()
        if not waiting:
            return False
        if len(waiting) > 1:
            LOG.info(f"{len(waiting)} checkpoints wait ({waiting}): the newest first")
        self._evaluate(waiting[0], ev, log)
        return True

    def _evaluate(self, step: int, ev: EvalConfig, log: LogConfig) -> None:
        out = step_dir(self.run_dir, step)
        out.mkdir(parents=True, exist_ok=True)
        LOG.info(f"evaluating the EMA of step {step} -> {out}")
        if not self._export(step, out / "unet"):
            return
        nproc = self.nproc or ev.nproc
        code = self._command(["eval", "--config", str(self.run_dir / "config.yaml"), "--nproc", str(nproc),
                              f"eval.unet={out / 'unet'}", f"eval.out={out}", "eval.during_training=false"])
        if code != 0:
            self._stop_if_asked()
            record_skipped(self.run_dir, step, f"`dist-diffusion eval` failed with exit code {code} (its log is "
                                               f"above; rerun the watcher to try again after removing the entry)")
            return
        if self.trackers is None:
            from ..logs.trackers import Trackers  # torch (TensorBoard's writer): once there is something to log

            self.trackers = Trackers(log, self.run_dir, {}, role="eval")
        record_step(self.run_dir, ev.best_metric, step, evaluated_steps(self.run_dir), self.trackers)

    def _export(self, step: int, unet: Path) -> bool:
        """The step's EMA as an export (kept: eval reads it, ``export --best`` copies it)."""
        if (unet / "dist_diffusion.json").is_file():
            return True
        staging = unet.with_name("unet.partial")
        code = self._command(["export", "--run-dir", str(self.run_dir), "--step", str(step), "--out", str(staging)])
        if code == 0:
            os.replace(staging, unet)
            return True
        self._stop_if_asked()
        folder = self.run_dir / "checkpoints" / tag_for(step)
        why = "its checkpoint was pruned while it was exported" if not (folder / COMPLETE).exists() else \
            f"`dist-diffusion export` failed with exit code {code}"
        record_skipped(self.run_dir, step, why)
        return False

    def _command(self, argv: list[str]) -> int:
        """``dist-diffusion ARGV`` as a process of its own; a stop request is passed on to it
        (it stops at its next shard) and then ends the watcher."""
        self.child = subprocess.Popen([sys.executable, "-m", "dist_diffusion.cli", *argv])
        try:
            while self.child.poll() is None:
                if self.stops.reason() != NO_STOP:
                    self.child.terminate()
                    self.child.wait()
                    break
                time.sleep(0.2)
            return self.child.returncode
        finally:
            self.child = None

    def _stop_if_asked(self) -> None:
        reason = self.stops.reason()
        if reason != NO_STOP:
            LOG.info(f"stopped: evaluated steps are kept; `dist-diffusion watch --run-dir {self.run_dir}` resumes")
            raise stop_exception(reason)


class EventWatcher(Watcher):
    """A watcher fed by checkpoint events instead of looking for COMPLETE markers (the Ray
    launcher's actor: rank 0 announces each complete checkpoint). Runs :meth:`run` on a
    thread of its own while the events arrive."""

    def __init__(self, run_dir: Path, nproc: int | None = None):
        super().__init__(run_dir, nproc, poll_s=0.5, until_marked=True)
        self.stops.close()  # Ray owns its workers' signals, and a thread may not change handlers
        self.announced: set[int] = set()
        self.ended = False

    def checkpoint_complete(self, step: int) -> None:
        self.announced.add(step)

    def end(self) -> None:
        self.ended = True

    def complete_steps(self) -> set[int]:
        """Announced and still there (not pruned since)."""
        return {step for step in self.announced if (self.run_dir / "checkpoints" / tag_for(step) / COMPLETE).exists()}

    def training_ended(self) -> bool:
        return self.ended


class _only_watcher:
    """One watcher per run: a second one (a requeued companion job beside a live one) leaves
    at once. flock: the kernel drops it with the process, however it ends."""

    def __init__(self, run_dir: Path):
        self.path = eval_root(run_dir) / ".watcher.lock"

    def __enter__(self):
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ConfigError(f"another watcher follows {self.path.parent.parent} already; this one is not "
                              f"needed") from None
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def mark_training_ended(run_dir: Path) -> None:
    """The launcher's word that no further checkpoint will come (training ended or failed)."""
    eval_root(run_dir).mkdir(parents=True, exist_ok=True)
    (eval_root(run_dir) / ENDED).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")


def mark_training_started(run_dir: Path) -> None:
    (eval_root(run_dir) / ENDED).unlink(missing_ok=True)


def check_beside_training(ev: EvalConfig) -> None:
    """What the watcher will need, checked before training starts: one line each."""
    if not ev.during_training:
        return
    from .features import check_extractor

    if not ev.reference:  # data.shards may hold latents: the watcher scores images
        raise ConfigError("eval.during_training needs reference images: set eval.reference to image shards "
                          "from prepare (held-out images: prepare with data.holdout_fraction)")
    check_extractor(ev)
