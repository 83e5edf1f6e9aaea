"""Evaluate on a Ray cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launchers/ray_sample.py CONFIG eval.unet=DIR eval.out=s3://BUCKET/eval [key=value...]

Ray Train places ``launch.nodes * launch.workers_per_node`` workers (GPUs and CPUs from
``launch.*``) and sets up their process group; each runs the sampling job on its share
of the shards, and the ranks reduce feature sums into the report (written to
``eval.out``, which should be S3 or a shared path). A rerun skips finished shards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

from dist_diffusion.config import derive, to_yaml  # noqa: E402
from launchers.ray_train import config_from_argv, scaling, worker_config  # noqa: E402


def sample_worker(loop_config: dict) -> None:
    from dist_diffusion.evaluate.sample import evaluate

    evaluate(worker_config(loop_config))


def main(argv: list[str] | None = None) -> int:
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    cfg = config_from_argv(argv, __doc__, "launchers/ray_sample.py")
    if not cfg.eval.out.startswith("s3://"):
        cfg = derive(cfg, {"eval.out": str(Path(cfg.eval.out).resolve())})  # workers run in Ray's copy of the checkout
    storage = cfg.launch.storage_path or f"{cfg.eval.out.rstrip('/')}/ray"
    TorchTrainer(sample_worker, train_loop_config={"config_yaml": to_yaml(cfg)}, scaling_config=scaling(cfg),
                 run_config=RunConfig(name="eval", storage_path=storage,
                                      failure_config=FailureConfig(max_failures=cfg.launch.max_failures))).fit()
    print(json.dumps({"report": f"{cfg.eval.out.rstrip('/')}/report.json"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
