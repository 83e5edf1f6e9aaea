"""The GPU path, checked on CPU: what a first multi-GPU run would otherwise find by crashing.

Collectives on an NCCL-only group must carry tensors on the process's GPU; SLURM's GPU
binding must leave cuda:LOCAL_RANK visible; a GPU that was asked for and is missing is an
error, not a quiet CPU run; sample grids never move the training VAE; and the training
step makes no host-device sync of its own between log steps.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_dist_diffusion
from dist_diffusion.config import ConfigError, load_config
from dist_diffusion.runtime import distributed
from dist_diffusion.runtime.env import process_env

ROOT = Path(__file__).resolve().parents[1]


class Reached(Exception):
    """Raised by a recording collective: the call got there, and its tensor was seen."""


@pytest.fixture
def two_rank_group_on_meta(monkeypatch):
    """A pretend 2-rank group whose device is `meta`: any tensor a collective receives that
    is not on `meta` would, on an NCCL group, be a CPU tensor crashing the run."""
    seen = []

    def record(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Reached

    def record_gather(parts, tensor, *args, **kwargs):
        seen.extend([tensor.device, *(p.device for p in parts)])
        raise Reached

    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed.dist, "all_reduce", record)
    monkeypatch.setattr(distributed.dist, "all_gather", record_gather)
    monkeypatch.setattr(distributed, "device", lambda: torch.device("meta"))
    return seen


@pytest.mark.parametrize("call", [
    lambda d: d.mean_over_ranks(torch.tensor([1.0, 2.0])),  # the logger's CPU floats
    lambda d: d.any_rank(True),
    lambda d: d.all_reduce_sum(__import__("numpy").ones(3)),
    lambda d: d.all_gather_flat(torch.ones(4)),
], ids=["mean_over_ranks", "any_rank", "all_reduce_sum", "all_gather_flat"])
def test_every_collective_carries_its_tensor_on_the_process_device(two_rank_group_on_meta, call):
    with pytest.raises(Reached):
        call(distributed)
    assert two_rank_group_on_meta and set(two_rank_group_on_meta) == {torch.device("meta")}


def test_no_collective_outside_the_one_helper_module():
    """Every all_reduce/all_gather/broadcast of the package goes through runtime/distributed.py."""
    names = {"all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_gather_into_tensor"}
    offenders = []
    for path in (ROOT / "dist_diffusion").rglob("*.py"):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in names:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
    assert offenders == []


SLURM_8_TASKS = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8"}


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch believes in `count` GPUs; set_device only records."""
    state = {"count": 1, "set": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: state["set"].append(i))
    yield state
    distributed._DEVICE = torch.device("cpu")


def test_eight_slurm_tasks_with_one_visible_gpu_each_get_the_clear_error(fake_cuda, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # what --gpus-per-task=1 gives task 5
    env = process_env(SLURM_8_TASKS)
    assert env.local_rank == 5
    with pytest.raises(ConfigError) as err:
        distributed.select_device("auto", env.local_rank)
    assert "cuda:5" in str(err.value) and "sees 1 GPU" in str(err.value) and "--gpus-per-node" in str(err.value)
    assert fake_cuda["set"] == []  # refused before binding anything


def test_eight_slurm_tasks_seeing_all_eight_gpus_bind_their_local_rank(fake_cuda):
    fake_cuda["count"] = 8
    env = process_env(SLURM_8_TASKS)
    assert distributed.select_device("auto", env.local_rank) == torch.device("cuda", 5)
    assert fake_cuda["set"] == [5]


def test_sbatch_scripts_bind_gpus_per_node_not_per_task():
    for script in ("slurm/train_latent.sh", "slurm/sample_fid.sh"):
        header = [line for line in (ROOT / script).read_text().splitlines() if line.startswith("#SBATCH")]
        assert not any("--gpus-per-task" in line for line in header), script
        assert any("--gpus-per-node" in line for line in header), script


@pytest.mark.parametrize("override", ["runtime.device=cuda", "launch.gpus_per_worker=1"])
def test_asking_for_a_gpu_without_cuda_is_one_line_before_any_worker(tmp_path, override):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = run_dist_diffusion(["train", "--config", "configs/tiny.yaml",
                              "--nproc", "2", override, f"train.run_dir={tmp_path / 'run'}"], timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = out.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: ")
    assert f"built for CUDA {built_for(torch.version.cuda)}" in line and "driver" in line and "runtime.device=cpu" in line
    assert not (tmp_path / "run").exists()  # no rank started


def built_for(cuda: str | None) -> str:
    """What the line says torch is built for: a CUDA build its CUDA version, a CPU build so."""
    return cuda or "none (a CPU build)"


@pytest.mark.parametrize("cuda", ["13.0", None], ids=["cuda-build", "cpu-build"])
def test_the_no_gpu_line_names_torchs_build_for_either_build(monkeypatch, cuda):
    """The line above on both builds of torch, whichever this machine has."""
    monkeypatch.setattr(torch.version, "cuda", cuda)
    with pytest.raises(ConfigError) as err:
        distributed.check_cuda_usable("cuda", False, driver=lambda: None, cuda_available=lambda: False)
    assert f"built for CUDA {built_for(cuda)}, NVIDIA driver not found" in str(err.value)


def test_cpu_device_with_gpus_per_worker_is_a_config_error():
    with pytest.raises(ConfigError, match="runtime.device=cpu but launch.gpus_per_worker=1"):
        load_config(ROOT / "configs/tiny.yaml", ["runtime.device=cpu", "launch.gpus_per_worker=1"])


def test_more_than_one_gpu_per_process_is_one_config_error_naming_the_fix():
    """Each rank binds cuda:LOCAL_RANK; a second GPU per process would idle (or, under Ray,
    belong to another worker)."""
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny.yaml", ["runtime.device=cuda", "launch.gpus_per_worker=8"])
    text = str(err.value)
    assert text.count("launch.gpus_per_worker=8") == 1 and "\n" not in text
    assert "set launch.gpus_per_worker=1 and raise launch.workers_per_node" in text
    load_config(ROOT / "configs/tiny.yaml", ["runtime.device=cuda", "launch.gpus_per_worker=1"])  # accepted


def test_sample_grid_leaves_the_training_vae_where_it_is(tmp_path, monkeypatch):
    from dist_diffusion.config import unet_input_shape
    from dist_diffusion.core.models import build_unet, build_vae
    from dist_diffusion.train.grids import ema_grid

    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.num_classes=2", "data.resolution=16", "sample.steps=2"])
    vae = build_vae(cfg.vae, cfg.data).eval().to(torch.bfloat16)  # e.g. the on-the-fly encoder in bf16 on cuda:0
    before = [(p.device, p.dtype, p.data_ptr()) for p in vae.parameters()]
    for name in ("cpu", "cuda", "float", "half", "to"):  # any of these would move or cast it in place
        monkeypatch.setattr(vae, name, lambda *a, _n=name, **k: pytest.fail(f"vae.{_n}() called"))
    unet = build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data))
    path = ema_grid(unet, cfg.sample, cfg.diffusion, vae, tmp_path / "grid.png", per_class=2)
    assert path.exists()
    assert [(p.device, p.dtype, p.data_ptr()) for p in vae.parameters()] == before


def test_engine_ema_is_one_flat_update_equal_to_per_tensor_lerp():
    from types import SimpleNamespace

    from dist_diffusion.core.ema import ema_update_
    from dist_diffusion.runtime.ema import EngineEMA

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(4, 5))
    ema = EngineEMA(SimpleNamespace(module=module), zero_stage=2)
    reference = [p.detach().clone() for p in module.parameters()]
    for decay in (0.5, 0.9, 0.99):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        ema.update(decay)
        ema_update_(reference, [p.detach() for p in module.parameters()], decay)
    state = ema.state_dict()
    assert all(torch.equal(state[n], r) for n, r in zip(ema.names, reference))
    assert all(t.data_ptr() != ema.flat.data_ptr() for t in state.values())  # copies: safetensors-safe


SYNC_PROBE = r"""
import json, os, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, "tests")
from conftest import make_class_folders
from dist_diffusion.config import load_config
from dist_diffusion.data.prepare import prepare
from dist_diffusion.train import build_run, stream_batches, train_step

root = Path(tempfile.mkdtemp())
make_class_folders(root / "src", classes=2, per_class=20)
cfg = load_config("configs/tiny.yaml", ["vae.enabled=false", "data.resolution=16", "model.num_classes=2",
    "train.batch_size=8", "data.num_workers=0", f"data.shards={root / 'shards'}", f"train.run_dir={root / 'run'}",
    "train.log_every=1000", "data.samples_per_shard=10", "data.hflip=false"])
prepare(root / "src", str(root / "shards"), cfg.data, progress=False)
run = build_run(cfg)
batches = stream_batches(run)
train_step(run, batches); run.state.step += 1  # warm-up
calls = []
def counting(name, original):
    def wrapper(self, *a, **k):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("dist_diffusion"):
            calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
        return original(self, *a, **k)
    return wrapper
for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
    setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
for _ in range(4):  # more than one epoch (40 samples, batch 8): the epoch turn too
    m = train_step(run, batches); run.state.step += 1
    run.ema.update(0.99); run.logger.step(run.state.step, m)
print(json.dumps(calls))
"""


def test_training_step_makes_no_host_sync_of_its_own_between_log_steps():
    out = subprocess.run([sys.executable, "-c", SYNC_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = json.loads(out.stdout.strip().splitlines()[-1])
    assert calls == []


ENGINE_TIMER_PROBE = r"""
import json
from pathlib import Path
import tempfile
import torch
from deepspeed.accelerator import get_accelerator
from dist_diffusion.config import load_config
from dist_diffusion.runtime.distributed import init_process_group
from dist_diffusion.runtime.engine import build_engine

cfg = load_config("configs/tiny.yaml", ["train.batch_size=2", "runtime.precision=fp32"])
init_process_group("cpu")
engine = build_engine(cfg.train, cfg.runtime, torch.nn.Linear(4, 4), 1, Path(tempfile.mkdtemp()))
syncs = []
accelerator = get_accelerator()
original = accelerator.synchronize
accelerator.synchronize = lambda *a, **k: (syncs.append(1), original(*a, **k))[1]
for _ in range(4):  # past the timer's start_step (2), where it would synchronize
    engine.backward(engine(torch.randn(2, 4)).square().mean())
    engine.step()
print(json.dumps({"config": engine._config.timers_config.enabled, "timer": engine.tput_timer.config.enabled,
                  "synchronized": engine.tput_timer.config.synchronized, "syncs": len(syncs)}))
"""


def test_deepspeeds_throughput_timer_is_off_in_the_engine():
    """DeepSpeed's throughput timer defaults to on and synchronized: a cudaDeviceSynchronize in
    every engine.forward and engine.step. The engine the project builds must have it off."""
    out = subprocess.run([sys.executable, "-c", ENGINE_TIMER_PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1",
                                           "LOCAL_RANK": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"config": False, "timer": False, "synchronized": False, "syncs": 0}, seen


PEER_GONE_TEXTS = [
    "[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.7.0.12]:44703",
    "NCCL error in: ProcessGroupNCCL.cpp:2046, remote process exited or there was a network error, NCCL version "
    "2.27.3\nncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely.",
    "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=812, OpType=ALLREDUCE) ran for "
    "600000 milliseconds before timing out.",
]
OTHER_NCCL_TEXTS = [  # a first-run IB/EFA or NVLS misconfiguration: the node is fine
    "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error (run with NCCL_DEBUG=INFO for details), NCCL "
    "version 2.27.3\nncclSystemError: System call (e.g. socket, malloc) or external library call failed or device "
    "error.\nLast error:\nNET/OFI Unable to find a usable provider",
    "NCCL error in: ProcessGroupNCCL.cpp:3342, invalid usage, NCCL version 2.27.3\nncclInvalidUsage: NVLS is not "
    "supported on this system",
]


@pytest.mark.parametrize("text", PEER_GONE_TEXTS)
def test_only_a_lost_peer_reads_as_lost_contact(text):
    from dist_diffusion.runtime.distributed import PeerLost, as_communication_failed, as_peer_lost

    for err in (RuntimeError(text), torch.distributed.DistBackendError(text)):
        lost = as_peer_lost(err)
        assert isinstance(lost, PeerLost) and "lost contact with another rank" in str(lost)
        assert as_communication_failed(err) is None


@pytest.mark.parametrize("text", OTHER_NCCL_TEXTS)
def test_any_other_nccl_error_is_shown_as_it_is_with_the_debug_variables(text, capsys):
    from dist_diffusion.runtime.distributed import as_communication_failed, as_peer_lost
    from dist_diffusion.runtime.rank import run_rank

    err = torch.distributed.DistBackendError(text)
    assert as_peer_lost(err) is None
    shown = str(as_communication_failed(err))
    assert text in shown and "lost contact" not in shown
    assert "NCCL_DEBUG=INFO" in shown and "NCCL_DEBUG_SUBSYS=INIT,NET" in shown

    def work():
        raise err

    assert run_rank(work) == (None, 3)
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: this rank: a collective failed: NCCL error in") and text in stderr
    assert "NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET" in stderr and "Traceback" not in stderr


def test_an_error_of_the_model_is_neither():
    from dist_diffusion.runtime.distributed import as_communication_failed, as_peer_lost

    err = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x5)")
    assert as_peer_lost(err) is None and as_communication_failed(err) is None


def test_eval_applies_the_numerics_settings_training_does(monkeypatch):
    """TF32 and cuDNN autotuning: one helper, called by training's apply_numerics and by eval."""
    from types import SimpleNamespace

    from dist_diffusion.evaluate import sample
    from dist_diffusion.runtime import engine

    cfg = load_config(ROOT / "configs/tiny.yaml", ["runtime.tf32=true"])
    flags = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32,
             "benchmark": torch.backends.cudnn.benchmark}
    try:
        engine.apply_device_numerics(cfg.runtime, CUDA_DEVICE)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags["matmul"], flags["cudnn"]
        torch.backends.cudnn.benchmark = flags["benchmark"]
    before = torch.backends.cudnn.benchmark
    engine.apply_device_numerics(cfg.runtime, torch.device("cpu"))  # the CPU: nothing changes
    assert torch.backends.cudnn.benchmark == before
    applied = []

    class Stop(Exception):
        pass

    def record(runtime, where):
        applied.append((runtime.tf32, where))
        raise Stop

    monkeypatch.setattr(sample, "init_process_group", lambda *a, **k: SimpleNamespace(is_main=False))
    monkeypatch.setattr(sample, "device", lambda: CUDA_DEVICE)
    monkeypatch.setattr(sample, "apply_device_numerics", record)
    with pytest.raises(Stop):
        sample.evaluate(cfg)
    assert applied == [(True, CUDA_DEVICE)]
    monkeypatch.setattr(engine, "apply_device_numerics", record)
    with pytest.raises(Stop):
        engine.apply_numerics(cfg.runtime, torch.nn.Linear(1, 1), CUDA_DEVICE)  # training's path


CUDA_DEVICE = torch.device("cuda", 0)
