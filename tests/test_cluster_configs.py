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
    assert text.startswith("#") and "\nFROM ${CUDA_IMAGE}" in text
    assert "torch==2.14.1" in text and "pip install -e ." in text


def test_container_cuda_matches_the_torch_build_and_carries_rdma_and_efa():
    import re

    text = (ROOT / "infra/Dockerfile").read_text()
    base = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel", text)
    assert base and base.groups() == ("13", "0")  # torch 2.14.1 from PyPI is cu130: nvcc must match
    for package in ("rdma-core", "libibverbs1", "ibverbs-providers", "efa_installer.sh", "ofi-nccl"):
        assert package in text, package
    assert "DS_BUILD_OPS=0" in text and ">= 580" in text


def test_aws_gpu_workers_get_efa_interfaces_and_devices():
    cfg = yaml.safe_load((ROOT / "infra/ray/aws.yaml").read_text())
    assert "--device=/dev/infiniband" in cfg["docker"]["run_options"]
    worker = cfg["available_node_types"]["gpu_worker"]["node_config"]
    cards = [n["NetworkCardIndex"] for n in worker["NetworkInterfaces"] if n["InterfaceType"] == "efa"]
    assert cards == [0, 1, 2, 3]  # p4d.24xlarge: 4 network cards


def test_sbatch_header_requeues_on_usr1():
    header = [line for line in (ROOT / "slurm/train_latent.sh").read_text().splitlines()
              if line.startswith("#SBATCH")]
    for option in ("--signal=USR1@120", "--requeue", "--gpus-per-node", "--cpus-per-task", "--time",
                   "--ntasks-per-node", "--nodes"):
        assert any(option in line for line in header), option
