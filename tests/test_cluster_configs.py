"""The cloud files that cannot run here: they parse and carry what a cluster needs."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
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


def test_container_recipe_installs_pinned_torch_and_the_package_with_its_node_extras():
    text = (ROOT / "infra/Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM ${CUDA_IMAGE}" in text
    assert text.index("torch==2.14.1") < text.index("pip install -c constraints.txt -e '.[ray,slurm,eval]'")
    assert re.search(r"^COPY [^\n]*constraints\.txt", text, re.M)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"ray", "slurm", "eval"} <= set(extras)
    assert "never trains a GPU node on CPU" not in text  # the claim the driver check replaces


def test_container_cuda_matches_the_torch_build_and_carries_rdma_and_efa():
    text = (ROOT / "infra/Dockerfile").read_text()
    base = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel", text)
    assert base and base.groups() == ("13", "0")  # torch 2.14.1 from PyPI is cu130: nvcc must match
    for package in ("rdma-core", "libibverbs1", "ibverbs-providers", "efa_installer.sh", "ofi-nccl"):
        assert package in text, package
    assert "DS_BUILD_OPS=0" in text and ">= 580" in text


def docker_options(docker: dict, node_type: dict, head: bool) -> list[str]:
    """The `docker run` options Ray gives a node: the shared ones plus its role's (Ray's
    DockerCommandRunner.run_init), a node type's own docker section overriding the top one."""
    docker = {**docker, **node_type.get("docker", {})}
    return docker.get("run_options", []) + docker.get("head_run_options" if head else "worker_run_options", [])


def test_aws_gpu_workers_get_efa_interfaces_and_devices_and_the_head_none():
    cfg = yaml.safe_load((ROOT / "infra/ray/aws.yaml").read_text())
    nodes, head = cfg["available_node_types"], cfg["head_node_type"]
    assert not any("/dev/infiniband" in o for o in docker_options(cfg["docker"], nodes[head], head=True))
    assert "GPU" not in nodes[head]["resources"] and nodes[head]["node_config"]["InstanceType"].startswith("m")
    assert "NetworkInterfaces" not in nodes[head]["node_config"]  # an m6i has no EFA
    expected = {"p4d.24xlarge": 4, "p5.48xlarge": 32}  # network cards, one EFA interface each
    for name, node in nodes.items():
        if name == head:
            continue
        options = docker_options(cfg["docker"], node, head=False)
        assert "--device=/dev/infiniband" in options and "--cap-add=IPC_LOCK" in options, name
        interfaces = node["node_config"]["NetworkInterfaces"]
        assert all(n["InterfaceType"] == "efa" for n in interfaces), name
        cards = expected[node["node_config"]["InstanceType"]]
        assert [n["NetworkCardIndex"] for n in interfaces] == list(range(cards)), name
        assert [n["DeviceIndex"] for n in interfaces] == [0] + [1] * (cards - 1), name  # AWS's EFA layout
    assert {n["node_config"]["InstanceType"] for n in nodes.values()} >= set(expected)  # A100 and H100


def test_aws_config_passes_rays_own_schema():
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = util.prepare_config(yaml.safe_load((ROOT / "infra/ray/aws.yaml").read_text()))
    util.validate_config(cfg)  # what `ray up` checks first: unknown keys, types, head type


def test_every_aws_node_starts_ray_in_the_image_after_its_driver_check():
    cfg = yaml.safe_load((ROOT / "infra/ray/aws.yaml").read_text())
    image = cfg["docker"]["image"]
    assert "ray start --head" in " ".join(cfg["head_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in cfg["worker_start_ray_commands"]
    # Every host runs the image's entry point (the driver check) where `ray up` shows its line.
    assert any(c.split()[:3] == ["docker", "run", "--rm"] and image in c.split() for c in cfg["initialization_commands"])
    dockerfile = (ROOT / "infra/Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
    assert entry == [f"{IMAGE_CHECKOUT}/infra/entrypoint.sh"] and in_checkout(entry[0]).is_file()
    assert re.search(rf"^WORKDIR {IMAGE_CHECKOUT}$", dockerfile, re.M)
    for name in ("infra/entrypoint.sh", "infra/check_driver.py", "launchers", "configs", "dist_diffusion"):
        assert re.search(rf"^COPY [^\n]*{name}", dockerfile, re.M), name  # what the nodes run is in the image
    # The job the header submits names this checkout's launcher and config.
    job = next(line for line in (ROOT / "infra/ray/aws.yaml").read_text().splitlines() if "python launchers/" in line)
    script, config = job.split("python ")[1].split()[:2]
    assert (ROOT / script).is_file() and (ROOT / config).is_file()
    setup = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert setup and all(in_checkout(c.split("-e ")[1].split()[0]) == ROOT for c in setup)


IMAGE_CHECKOUT = "/home/ray/dist_diffusion"  # infra/Dockerfile's WORKDIR: this checkout in the image


def in_checkout(path: str) -> Path:
    """An image path under the image's checkout, as the same path in this one."""
    assert path.startswith(IMAGE_CHECKOUT), path
    return ROOT / path[len(IMAGE_CHECKOUT):].lstrip("/")


def rayjob() -> dict:
    return yaml.safe_load((ROOT / "infra/kuberay/rayjob.yaml").read_text())


def rayjob_config(job: dict):
    """The config the RayJob's entrypoint runs, loaded here the way the launcher loads it."""
    from dist_diffusion.config import load_config

    argv = shlex.split(job["spec"]["entrypoint"])
    return load_config(str(in_checkout(argv[2])), argv[3:])


def test_kuberay_rayjob_runs_the_ray_launcher_on_the_image():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and in_checkout(argv[1]) == ROOT / "launchers/ray_train.py"
    assert in_checkout(argv[2]).is_file()
    cfg = rayjob_config(job)  # its overrides are real keys of the right types
    assert cfg.launch.gpus_per_worker == 1 and cfg.launch.storage_path.startswith("s3://")
    cluster = job["spec"]["rayClusterSpec"]
    groups = cluster["workerGroupSpecs"]
    assert cfg.launch.nodes == sum(g["replicas"] for g in groups)
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in groups]
    image = yaml.safe_load((ROOT / "infra/ray/aws.yaml").read_text())["docker"]["image"]
    assert re.search(r"2\.\d+", cluster["rayVersion"])
    # KubeRay keeps each container's command (the annotation), which runs the image's entry
    # point, then KubeRay's own ray start.
    assert job["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert container["image"] == image and "dist-diffusion" in image
        assert in_checkout(container["command"][0]) == ROOT / "infra/entrypoint.sh"
        assert "$KUBERAY_GEN_RAY_START_CMD" in container["args"][-1]


def test_kuberay_head_asks_for_no_gpu_and_workers_for_their_gpus():
    job = rayjob()
    cluster, launch = job["spec"]["rayClusterSpec"], rayjob_config(job).launch
    head = cluster["headGroupSpec"]
    resources = head["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in k or "efa" in k for part in resources.values() for k in part)
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training worker lands on the head
    for group in cluster["workerGroupSpecs"]:  # one pod per node, holding that node's workers
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == launch.workers_per_node * launch.gpus_per_worker
        assert int(limits["cpu"]) >= launch.workers_per_node * launch.cpus_per_worker
        assert limits["vpc.amazonaws.com/efa"] == 32  # p5.48xlarge
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]


def load_driver_check():
    spec = importlib.util.spec_from_file_location("check_driver", ROOT / "infra/check_driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("driver,cuda,stops", [
    ("535.104.05", "13.0", True),   # a CUDA 12 era driver under torch's cu130
    ("570.86.15", "13.0", True),
    ("580.65.06", "13.0", False),
    ("470.82.01", "12.8", True),
    ("525.60.13", "12.1", False),
    (None, "13.0", False),          # no driver: a CPU node or the Ray head
    ("535.104.05", None, False),    # a CPU build of torch needs no driver
])
def test_driver_check_stops_a_too_old_driver_with_one_line(capsys, driver, cuda, stops):
    check = load_driver_check()
    status = check.main(probe=lambda: driver, build=lambda: ("2.14.1", cuda))
    err = capsys.readouterr().err
    assert status == (2 if stops else 0) and (err.count("\n") == 1) == stops and err.count("\n") <= 1, err
    if stops:
        assert err.startswith("error: NVIDIA driver ") and driver in err and f"CUDA {cuda}" in err
        assert ">= 580" in err if cuda.startswith("13") else ">= 525" in err


def test_entrypoint_runs_the_command_after_the_check_and_stops_when_it_fails(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    ok = subprocess.run([str(ROOT / "infra/entrypoint.sh"), "echo", "started"], env=env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout == "started\n", ok.stderr  # this machine: no NVIDIA driver
    fake = tmp_path / "python"  # a check that refuses, as on a too-old driver
    fake.write_text("#!/bin/sh\necho 'error: NVIDIA driver 535.104.05 is too old' >&2\nexit 2\n")
    fake.chmod(0o755)
    stopped = subprocess.run([str(ROOT / "infra/entrypoint.sh"), "echo", "started"], capture_output=True,
                             env={**env, "PATH": f"{tmp_path}:/usr/bin:/bin"}, text=True, timeout=60)
    assert stopped.returncode == 2 and stopped.stdout == "" and stopped.stderr.count("\n") == 1


def test_sbatch_header_requeues_on_usr1():
    header = [line for line in (ROOT / "slurm/train_latent.sh").read_text().splitlines()
              if line.startswith("#SBATCH")]
    for option in ("--signal=USR1@120", "--requeue", "--gpus-per-node", "--cpus-per-task", "--time",
                   "--ntasks-per-node", "--nodes"):
        assert any(option in line for line in header), option


def test_submitit_srun_passes_the_allocations_cpus_per_task(tmp_path):
    """SLURM 22.05-23.02: srun does not inherit --cpus-per-task, so the launcher passes it."""
    sys.path.insert(0, str(ROOT / "launchers"))
    try:
        from submitit_slurm import make_executor
    finally:
        sys.path.remove(str(ROOT / "launchers"))
    from dist_diffusion.config import load_config

    cfg = load_config(ROOT / "configs/tiny.yaml", ["launch.cpus_per_worker=3", f"launch.job_dir={tmp_path}"])
    script = make_executor(cfg, local=False)._executor._make_submission_file_text("python train.py", "1")
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert "#SBATCH --cpus-per-task=3" in script and "--cpus-per-task=3" in srun, script
