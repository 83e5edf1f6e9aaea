"""The cloud files that cannot run here: they parse and carry what a cluster needs."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_aws_ray_cluster_config_has_head_gpu_workers_profile_and_setup():
    cfg = yaml.safe_load((ROOT / "infra/ray/aws.yaml").read_text())
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    workers = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert workers and all(n["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6")) for n in workers)
    assert all("IamInstanceProfile" in n["node_config"] for n in nodes.values())  # S3 without keys
    assert all(n["min_workers"] == n["max_workers"] for n in workers)  # whole cluster up front
    assert any("pip install" in c for c in cfg["setup_commands"])
    assert cfg["docker"]["image"] and "ray start --head" in " ".join(cfg["head_node_start_ray_commands"]
                                                                     if "head_node_start_ray_commands" in cfg
                                                                     else cfg["head_start_ray_commands"])


def test_container_recipe_installs_pinned_torch_and_the_package():
    text = (ROOT / "infra/Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM nvidia/cuda:" in text
    assert "torch==2.14.1" in text and "pip install -e ." in text


def test_sbatch_header_requeues_on_usr1():
    header = [line for line in (ROOT / "slurm/train_latent.sh").read_text().splitlines()
              if line.startswith("#SBATCH")]
    for option in ("--signal=USR1@120", "--requeue", "--gpus-per-task=1", "--cpus-per-task", "--time",
                   "--ntasks-per-node", "--nodes"):
        assert any(option in line for line in header), option
