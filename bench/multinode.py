"""Step time on two nodes against one node, on this machine's 2-node cluster.

1 node x 2 processes: `dist-diffusion train --nproc 2` in this machine's own namespace,
where DeepSpeed reduces the gradients through shared memory. 2 nodes x 1 process:
`sbatch --nodes=2 --ntasks-per-node=1 slurm/train_latent.sh` on infra/local/cluster.sh's
cluster, where gloo reduces them over the bridge (veth pairs, TCP). Same recipe (the tiny
UNet, 32 px, global batch 32), same shards in the cluster's S3, one CPU thread per
process. The two layouts alternate for ROUNDS rounds; a run's step time is the median
over its steps after the first SKIP (batch / images per second), and the figure is the
median over rounds of two-node / one-node step time. Both layouts share this machine's
2 cores, so the figure is what crossing the node boundary costs, not the scaling of
more hardware. Prints `two_node_vs_one_node_step_ratio=<x>` last (goal <= 1.15).
Needs root for the namespaces; without them it prints `multinode bench skipped: <why>`.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_class_folders  # noqa: E402

CLUSTER = str(ROOT / "infra/local/cluster.sh")
ROUNDS, STEPS, SKIP = 3, 24, 4
RECIPE = ["vae.enabled=false", "data.resolution=32", "model.num_classes=4", "train.batch_size=32",
          "train.warmup_steps=2", "train.log_every=1", "data.num_workers=0", "data.hflip=false",
          f"train.max_steps={STEPS}", f"train.ckpt_every={STEPS}", "runtime.rendezvous_timeout_s=300"]


def cluster_up(state: Path) -> dict | None:
    """The 2-node cluster's client environment, or None (and the reason printed)."""
    env = {**os.environ, "CLUSTER_DIR": str(state), "CLUSTER_PREFIX": "b" + secrets.token_hex(2),
           "CLUSTER_SUBNET": f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(250)}",
           "DD_PYTHON": sys.executable}
    up = subprocess.run([CLUSTER, "up"], env=env, capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        print(f"multinode bench skipped: {(up.stderr.strip() or up.stdout.strip()).splitlines()[-1]}")
        return None
    out = subprocess.run(["bash", "-c", f"source {state}/env.sh && env -0"], capture_output=True, timeout=30)
    return {**env, **dict(kv.split("=", 1) for kv in out.stdout.decode().split("\0") if "=" in kv),
            "OMP_NUM_THREADS": "1"}


def put_shards(env: dict, work: Path) -> str:
    src = make_class_folders(work / "src", classes=4, per_class=80)
    subprocess.run([sys.executable, "-c", "import boto3; boto3.client('s3').create_bucket(Bucket='bench')"],
                   env=env, check=True, timeout=60)
    subprocess.run([sys.executable, "-m", "dist_diffusion.cli", "prepare", "--src", str(src), "--out",
                    "s3://bench/img32", "data.resolution=32", "data.samples_per_shard=80"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return "s3://bench/img32"


def step_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(32 / row["images_per_s"] for row in rows if row["step"] > SKIP)


def one_node(env: dict, run: Path, shards: str) -> float:
    subprocess.run([sys.executable, "-m", "dist_diffusion.cli", "train", "--config", "configs/tiny.yaml",
                    "--nproc", "2", *RECIPE, f"train.run_dir={run}", f"data.shards={shards}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
    return step_seconds(run)


def two_nodes(env: dict, run: Path, shards: str) -> float:
    done = subprocess.run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                           "--cpus-per-task=1", f"--output={run}.out", "slurm/train_latent.sh", "configs/tiny.yaml",
                           *RECIPE, f"train.run_dir={run}", f"data.shards={shards}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"the 2-node run failed: {done.stderr}{Path(f'{run}.out').read_text()[-3000:]}")
    return step_seconds(run)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dd-multinode-") as tmp:
        work = Path(tmp)
        env = cluster_up(work / "cluster")
        if env is None:
            return 0
        try:
            shards = put_shards(env, work)
            ratios = []
            for r in range(ROUNDS):
                single = one_node(env, work / f"one-node-{r}", shards)
                double = two_nodes(env, work / f"two-nodes-{r}", shards)
                ratios.append(double / single)
                print(f"round {r + 1}: 1 node x 2 processes {single * 1000:.0f} ms/step, "
                      f"2 nodes x 1 process {double * 1000:.0f} ms/step, ratio {ratios[-1]:.3f}", flush=True)
        finally:
            subprocess.run([CLUSTER, "down"], env=env, capture_output=True, timeout=300)
    print(f"two_node_vs_one_node_step_ratio={statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
