"""Train on a Ray cluster with Ray Train:

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launchers/ray_train.py configs/imagenet100_latent.yaml [key=value...]

A ``TorchTrainer`` starts ``launch.nodes * launch.workers_per_node`` workers with
``launch.cpus_per_worker`` CPUs and ``launch.gpus_per_worker`` GPUs each; Ray sets up
the process group and ``train(cfg)`` runs DeepSpeed inside every worker. Every
complete checkpoint goes to Ray Train's storage (``launch.storage_path``); when a
worker dies, Ray restarts the group (at most ``launch.max_failures`` times) and the
run resumes from the newest checkpoint there. ``--working-dir .`` ships this checkout,
so the workers import the same ``dist_diffusion``; its dependencies come from the
cluster image (``infra/Dockerfile``).

With ``eval.during_training`` an actor with resources of its own (``eval.cpus``,
``eval.gpus``) evaluates the checkpoints beside training: rank 0 sends it each complete
checkpoint's step, and after training it evaluates what is left, then the driver prints its
summary. It reads the checkpoints from ``train.run_dir``, so that directory must be one
every node sees (a shared file system), as the actor may run on any node.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

from dist_diffusion.config import Config, ConfigError, derive, load_config, to_yaml  # noqa: E402
from dist_diffusion.extras import require, require_trackers  # noqa: E402


def train_worker(loop_config: dict) -> None:
    """Runs in each Ray Train worker, inside the process group Ray created."""
    import ray.train

    from dist_diffusion.train import train

    # Ray runs this function in a thread, where Python cannot take signals; a lost or
    # preempted node is Ray's to notice, and it restarts from the stored checkpoint.
    cfg = derive(worker_config(loop_config), {"train.preempt_signals": []}, "the Ray worker's config")
    restore_from_ray_storage(cfg, ray.train.get_checkpoint(), ray.train.get_context().get_local_rank())

    evaluator = loop_config.get("evaluator")  # eval.during_training: the actor beside training

    def report(step: int, folder: Path) -> None:
        # One upload per node: its local rank 0 hands over the folder with that node's
        # shards; Ray merges the nodes' folders into one checkpoint in storage.
        local_main = ray.train.get_context().get_local_rank() == 0
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if local_main else None
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=folder.name)
        if evaluator is not None and ray.train.get_context().get_world_rank() == 0:
            evaluator.checkpoint_complete.remote(step)  # an event: the actor never polls storage

    summary = train(cfg, on_checkpoint=report)
    print(json.dumps(summary), flush=True)


def worker_config(loop_config: dict) -> Config:
    """The driver's resolved config, shipped as YAML, validated again in the worker."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(loop_config["config_yaml"])
        f.flush()
        return load_config(f.name)


def restore_from_ray_storage(cfg: Config, checkpoint, local_rank: int) -> None:
    """After a restart, put Ray's newest checkpoint into the run directory, where
    ``train`` resumes from it (a node that kept its own copy already has it)."""
    import os
    import shutil
    import time

    if checkpoint is None:
        return
    target = Path(cfg.train.run_dir) / "checkpoints" / Path(checkpoint.path).name
    if local_rank == 0 and not (target / "COMPLETE").exists():
        staging = target.with_name(target.name + f".ray-{os.getpid()}")
        checkpoint.to_directory(str(staging))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)  # appears whole, so no rank sees a partial copy
    while not (target / "COMPLETE").exists():
        time.sleep(0.5)


def connect_and_check(cfg: Config) -> None:
    """Join the cluster and check it can hold the workers, before any of them starts."""
    import ray

    try:
        _check_reachable(cfg.launch.ray_address)
        ray.init(address=cfg.launch.ray_address, log_to_driver=True)
    except (ConnectionError, ValueError) as err:
        raise ConfigError(f"no Ray cluster at launch.ray_address={cfg.launch.ray_address!r} ({err}); start "
                          f"one (infra/local/ray.sh up) or submit with `ray job submit --address "
                          f"http://HEAD:8265 --working-dir . -- python launchers/ray_train.py ...`") from None
    have = ray.cluster_resources()
    launch, beside = cfg.launch, cfg.eval.during_training
    for name, per_worker in (("CPU", launch.cpus_per_worker), ("GPU", launch.gpus_per_worker)):
        need = per_worker * launch.world_size
        evaluator = getattr(cfg.eval, f"{name.lower()}s") if beside else 0
        if need + evaluator > have.get(name, 0):
            plus = f" + the evaluator's eval.{name.lower()}s={evaluator}" if evaluator else ""
            raise ConfigError(f"{launch.world_size} workers x {per_worker} {name} = {need} {name}s{plus}, but the "
                              f"Ray cluster has {have.get(name, 0):g}; lower launch.nodes, launch.workers_per_node "
                              f"or launch.{name.lower()}s_per_worker{' or eval.' + name.lower() + 's' if beside else ''}"
                              f", or grow the cluster")


def _check_reachable(address: str) -> None:
    """ray.init retries a dead GCS address for minutes; a TCP probe answers at once."""
    import socket

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ConnectionError(f"nothing listens at {address}: {err.strerror or err}") from None


def scaling(cfg: Config):
    """Ray Train's placement of the workers, from ``launch.*``."""
    from ray.train import ScalingConfig

    launch = cfg.launch
    resources = {"CPU": launch.cpus_per_worker, **({"GPU": launch.gpus_per_worker} if launch.gpus_per_worker else {})}
    return ScalingConfig(num_workers=launch.world_size, use_gpu=launch.gpus_per_worker > 0,
                         resources_per_worker=resources)


def config_from_argv(argv: list[str] | None, doc: str, prog: str) -> Config:
    """CONFIG [key=value...] -> a validated config on a reachable, big enough cluster;
    any problem is one line on stderr and exit code 2, before a worker starts."""
    from dist_diffusion.config.command_line import recipe_arguments

    config, overrides = recipe_arguments(f"python {prog}", doc, argv)
    try:
        require("ray.train", "ray", "launchers/ray_train.py")
        cfg = load_config(config, overrides)
        require_trackers(cfg.log.trackers)
        connect_and_check(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


class EvalBeside:
    """The Ray actor of eval.during_training: an EventWatcher on a thread of its own, fed
    by rank 0's checkpoint events (dist_diffusion.evaluate.beside)."""

    def __init__(self, run_dir: str, nproc: int):
        import threading

        from dist_diffusion.evaluate.beside import EventWatcher

        self.watcher = EventWatcher(Path(run_dir), nproc)
        self.summary: dict = {}
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.watcher.run()
        except BaseException as err:  # raised again by finish(), in the driver
            self.failure = err

    def checkpoint_complete(self, step: int) -> None:
        self.watcher.checkpoint_complete(step)

    def finish(self) -> dict:
        """Training ended: evaluate what is left, then return what was evaluated."""
        self.watcher.end()
        self.thread.join()
        if self.failure is not None:
            raise RuntimeError(f"evaluation beside training failed: {self.failure!r}") from self.failure
        return self.summary


def start_evaluator(cfg: Config):
    """The actor beside training, on its own resources (None when eval.during_training is off)."""
    import ray

    if not cfg.eval.during_training:
        return None
    options = {"num_cpus": cfg.eval.cpus, "num_gpus": cfg.eval.gpus, "max_concurrency": 4}
    return ray.remote(EvalBeside).options(**options).remote(cfg.train.run_dir, cfg.eval.nproc)


def finish_evaluator(evaluator) -> dict | None:
    """Training ended: the evaluator evaluates what is left; what it did (None: no evaluator)."""
    import ray

    return ray.get(evaluator.finish.remote()) if evaluator is not None else None


def make_trainer(cfg: Config, evaluator=None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    launch, run_dir = cfg.launch, Path(cfg.train.run_dir).resolve()
    storage = launch.storage_path or str(run_dir / "ray")
    return TorchTrainer(
        train_worker,
        train_loop_config={"config_yaml": to_yaml(cfg), "evaluator": evaluator},
        scaling_config=scaling(cfg),
        run_config=RunConfig(name=run_dir.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=launch.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last)))


def main(argv: list[str] | None = None) -> int:
    from dist_diffusion.errors import expected, one_line
    from dist_diffusion.evaluate.beside import check_beside_training
    from dist_diffusion.train.checks import preflight

    cfg = config_from_argv(argv, __doc__, "launchers/ray_train.py")
    try:
        preflight(cfg)
        check_beside_training(cfg.eval)
    except expected() as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    cfg = derive(cfg, {"train.run_dir": str(Path(cfg.train.run_dir).resolve())})  # the same place after a restart
    evaluator = start_evaluator(cfg)
    try:
        result = make_trainer(cfg, evaluator).fit()
    finally:
        evaluated = finish_evaluator(evaluator)
    print(json.dumps({"step": (result.metrics or {}).get("step"), "checkpoint": str(result.checkpoint.path)
                      if result.checkpoint else None, "run_dir": cfg.train.run_dir,
                      **({"evaluated": evaluated} if evaluated is not None else {})}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
