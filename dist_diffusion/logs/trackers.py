"""Experiment trackers behind one small interface: TensorBoard, Weights & Biases, MLflow
(``log.trackers``). Rank 0 of the trainer and the eval watcher each open one ``Trackers``
on the run directory; both log into the same tracker run.

- The config goes in as hyperparameters when a tracker run is created.
- Every value is keyed by the *training* step. W&B refuses a step lower than one it saw,
  and a resumed run (or the watcher, which evaluates the newest checkpoint first) logs
  lower steps: so W&B gets the step as a metric of its own (``train_step``), against which
  every other metric is plotted.
- A resumed run continues its tracker run: the ids live in ``RUN/trackers.json``, written
  by whichever process created the run first (under a lock: trainer and watcher start
  together).
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from pathlib import Path

from ..config import LogConfig
from ..extras import require
from . import get_logger

LOG = get_logger("trackers")
IDS_FILE = "trackers.json"
STEP_METRIC = "train_step"


class Trackers:
    """The trackers of ``log.trackers`` for one process writing into ``run_dir``. ``role``
    (train, eval) keeps the processes' files apart where a tracker needs that."""

    def __init__(self, log: LogConfig, run_dir: Path, hyperparams: dict, role: str = "train"):
        self.sinks = [_OPENERS[name](log, Path(run_dir), hyperparams, role) for name in log.trackers]

    def scalars(self, step: int, values: dict) -> None:
        clean = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and v == v}
        for sink in self.sinks:
            sink.scalars(step, clean)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG already written (a sample grid, the FID curve)."""
        for sink in self.sinks:
            sink.image(tag, Path(path), step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: the form MLflow's params take."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tracker_run_id(run_dir: Path, tracker: str, create) -> str:
    """The id of this run's ``tracker`` run: the stored one, else ``create()``'s, stored."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / f".{IDS_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the trainer and the watcher start at once
        path = run_dir / IDS_FILE
        ids = json.loads(path.read_text()) if path.is_file() else {}
        if tracker not in ids:
            ids[tracker] = create()
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(ids, indent=2) + "\n")
            os.replace(tmp, path)
        return ids[tracker]


class _TensorBoard:
    def __init__(self, log: LogConfig, run_dir: Path, hyperparams: dict, role: str):
        from torch.utils.tensorboard import SummaryWriter

        # one event file per process in the same folder: TensorBoard shows them as one run
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), filename_suffix=f".{role}")
        if role == "train":
            self.writer.add_text("config", "```\n" + json.dumps(hyperparams, indent=2) + "\n```", 0)

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, log: LogConfig, run_dir: Path, hyperparams: dict, role: str):
        wandb = require("wandb", "wandb", "log.trackers: [wandb]")
        self.wandb = wandb
        run_id = tracker_run_id(run_dir, "wandb", lambda: uuid.uuid4().hex[:12])
        settings = wandb.Settings(silent=True, **({"mode": log.wandb_mode} if log.wandb_mode else {}))
        self.run = wandb.init(project=log.project, id=run_id, resume="allow", name=run_dir.name, dir=str(run_dir),
                              config=hyperparams if role == "train" else None, job_type=role, settings=settings,
                              reinit="create_new")
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def scalars(self, step: int, values: dict) -> None:
        self.run.log({**values, STEP_METRIC: step})

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path)), STEP_METRIC: step})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, log: LogConfig, run_dir: Path, hyperparams: dict, role: str):
        mlflow = require("mlflow", "mlflow", "log.trackers: [mlflow]")
        uri = log.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps the file store, behind this opt-in; a server needs none
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.metric, self.param = mlflow.entities.Metric, mlflow.entities.Param
        self.run_id = tracker_run_id(run_dir, "mlflow", lambda: self._create(log, run_dir, hyperparams))

    def _create(self, log: LogConfig, run_dir: Path, hyperparams: dict) -> str:
        experiment = self.client.get_experiment_by_name(log.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(log.project)
        run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        # params are write-once in MLflow: logged when the run is created, never again
        params = [(key, json.dumps(value) if not isinstance(value, str) else value)
                  for key, value in flat(hyperparams).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            batch = [self.param(k, v[:6000]) for k, v in params[start:start + 100]]
            self.client.log_batch(run_id, params=batch)
        return run_id

    def scalars(self, step: int, values: dict) -> None:
        import time

        now = int(time.time() * 1000)
        metrics = [self.metric(key, value, now, step) for key, value in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, path: Path, step: int) -> None:
        from PIL import Image

        self.client.log_image(self.run_id, Image.open(path).convert("RGB"), key=tag.replace("/", "_"), step=step)

    def close(self) -> None:
        pass  # the trainer and the watcher share the run: neither ends it for the other


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
