"""Checkpoint housekeeping with a real 2-process gloo group and a stand-in engine: who
writes the EMA, and who prunes which run directory (rank 0's, shared or node-local)."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_diffusion.runtime import checkpoint

STEPS, KEEP = (2, 4, 6, 8), 2


class FolderEngine:
    """DeepSpeed's part of a save: each rank writes its own shard into the tag's folder."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"shard{dist.get_rank()}.pt").write_bytes(b"x")


def _two_nodes(rank: int, store: str, roots: list[str], sharded: bool) -> None:
    os.environ["LOCAL_RANK"] = "0"  # one rank per node: each is its node's local rank 0
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ema = SimpleNamespace(sharded=sharded, state_dict=lambda: {"w": torch.full((2,), float(rank))}, sigma_rels=())
    root = Path(roots[rank])
    (root / "step00000001").mkdir(parents=True, exist_ok=True)  # debris of a save that never completed
    for step in STEPS:
        checkpoint.save(FolderEngine(), ema, root, step, {"step": step}, KEEP,
                        {"world_size": 2, "zero_stage": 3 if sharded else 2})
    dist.barrier()
    dist.destroy_process_group()


def run_two_nodes(tmp_path, roots, sharded=False):
    mp.spawn(_two_nodes, args=(str(tmp_path / "store"), [str(r) for r in roots], sharded), nprocs=2, join=True)


def tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_every_node_prunes_its_own_run_directory(tmp_path):
    """Ray's worker nodes keep node-local run directories: rank 0's COMPLETE is on another
    disk, and the node's local rank 0 must still drop the old copies (only rank 0 did)."""
    roots = [tmp_path / "node1/checkpoints", tmp_path / "node2/checkpoints"]
    run_two_nodes(tmp_path, roots)
    assert tags(roots[0]) == tags(roots[1]) == ["step00000006", "step00000008"]
    assert (roots[0] / "step00000008/COMPLETE").exists() and not (roots[1] / "step00000008/COMPLETE").exists()
    assert checkpoint.latest_complete(roots[1]) is None  # the node's share alone is never resumable
    assert sorted(p.name for p in (roots[1] / "step00000008").iterdir()) == [checkpoint.NODE_SAVED, "shard1.pt", "state_rank001.json"]
    # ZeRO-2: the EMA once, by rank 0 (every rank holds the same copy)
    assert checkpoint.ema_files(roots[0] / "step00000008") == ["ema_rank000.safetensors"]
    assert (roots[0] / "step00000008/ema_rank000.safetensors").exists()


def test_a_shared_run_directory_is_pruned_by_rank_0_alone(tmp_path):
    shared = tmp_path / "shared/checkpoints"
    run_two_nodes(tmp_path, [shared, shared], sharded=True)
    assert tags(shared) == ["step00000006", "step00000008"]
    names = sorted(p.name for p in (shared / "step00000008").iterdir())
    assert checkpoint.NODE_SAVED not in names and "COMPLETE" in names
    # ZeRO-3: one EMA file per rank (its own partitions)
    assert [n for n in names if n.startswith("ema_")] == ["ema_rank000.safetensors", "ema_rank001.safetensors"]
    assert checkpoint.ema_files(shared / "step00000008") == ["ema_rank000.safetensors", "ema_rank001.safetensors"]


def test_prune_keeps_what_is_newer_than_the_kept_and_tolerates_a_vanished_folder(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step, mark in ((1, "COMPLETE"), (2, "COMPLETE"), (3, None), (4, "COMPLETE"), (5, None)):
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
        if mark:
            (root / checkpoint.tag_for(step) / mark).write_text("")
    real_rmtree = checkpoint.shutil.rmtree

    def another_node_was_first(path, ignore_errors=False):
        real_rmtree(path)  # gone before this node's rmtree runs
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", another_node_was_first)
    checkpoint._prune(root, 2)
    # step 3 (incomplete, between kept ones) is debris; step 5 may be a save under way
    assert tags(root) == ["step00000002", "step00000004", "step00000005"]
    checkpoint._prune(tmp_path / "checkpoints", 1, marks=("NOTHING",))  # nothing complete: nothing goes
    assert tags(root) == ["step00000002", "step00000004", "step00000005"]


def timed_run(minutes: float, saves: list[int], now: list[float]):
    from dist_diffusion.config import load_config

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=12", "train.ckpt_every=1000", "train.sample_every=0",
                                            "train.preempt_check_every=2", f"train.ckpt_every_minutes={minutes}"])
    state = SimpleNamespace(step=0)
    state.save = lambda *a: (saves.append(state.step), Path(f"step{state.step}"))[1]
    return SimpleNamespace(train=cfg.train, runtime=cfg.runtime, objective=SimpleNamespace(draws_grids=False), state=state, ema=SimpleNamespace(update=lambda decay, step: None, sigma_rels=()), spec=None,
                           engine=None, env=SimpleNamespace(world_size=1, rank=0, is_main=True),
                           logger=SimpleNamespace(step=lambda *a: None, info=lambda *a: None,
                                                  flush_samples=lambda: None), on_checkpoint=None,
                           clock=lambda: now[0], last_save=0.0, writer=None, pending=None)


def run_loop(monkeypatch, run, now, minutes_per_step):
    from dist_diffusion.runtime.preemption import NO_STOP
    from dist_diffusion.train import loop

    def step(run, batches):
        now[0] += 60 * minutes_per_step
        return {}

    monkeypatch.setattr(loop, "train_step", step)
    loop._loop(run, iter(()), SimpleNamespace(reason=lambda: NO_STOP))


def test_ckpt_every_minutes_saves_at_the_first_check_past_the_interval(monkeypatch):
    saves, now = [], [1000.0]  # a minute per step; checks at every 2nd step; every 3 minutes
    run_loop(monkeypatch, timed_run(3, saves, now), now, minutes_per_step=1)
    assert saves == [4, 8, 12]  # 4 min > 3 at step 4, then 4 min again at 8; 12 is the last step
    saves, now = [], [1000.0]
    run_loop(monkeypatch, timed_run(0, saves, now), now, minutes_per_step=1)  # 0 is off
    assert saves == [12]


def test_a_timed_checkpoint_due_on_any_rank_is_taken_by_every_rank(monkeypatch):
    """The decision rides the preemption check's collective as a max over ranks: a rank
    whose own clock says "not yet" still saves when another rank's says "due"."""
    from dist_diffusion.train import loop

    sent = []

    def other_rank_is_due(values):
        sent.append(list(values))
        return [values[0], 1, *values[2:]]

    monkeypatch.setattr(loop, "max_each_over_ranks", other_rank_is_due)
    saves, now = [], [1000.0]
    run_loop(monkeypatch, timed_run(3, saves, now), now, minutes_per_step=0)  # this rank's clock stands still
    assert saves == [2, 4, 6, 8, 10, 12] and all(due == 0 for _, due, _ in sent)


# ---- background checkpoints (train.background_checkpoints): a real DeepSpeed engine, world 1 ----

BACKGROUND_PROBE = r"""
import json, sys, threading
from pathlib import Path
import torch
from dist_diffusion.config import load_config
from dist_diffusion.runtime import checkpoint
from dist_diffusion.runtime.background import BUSY, IDLE, BackgroundWriter, install_background_engine
from dist_diffusion.runtime.distributed import init_process_group
from dist_diffusion.runtime.ema import EngineEMA
from dist_diffusion.runtime.engine import build_engine

root, mode = Path(sys.argv[1]), sys.argv[2]
cfg = load_config("configs/tiny.yaml", ["train.batch_size=2", "runtime.precision=fp32", "runtime.zero_stage=2"])
init_process_group("cpu")
torch.manual_seed(0)
engine = build_engine(cfg.train, cfg.runtime, torch.nn.Linear(4, 4), 1, root.parent)
ema = EngineEMA(engine, 2)
writer = BackgroundWriter()
install_background_engine(engine, writer)
meta = {"world_size": 1, "zero_stage": 2}

def step():
    engine.backward(engine(torch.randn(2, 4)).square().mean())
    engine.step()
    ema.update(0.5)

step()
checkpoint.save(engine, ema, root, 1, {"step": 1}, 2, meta)  # blocking: the resume point
step()
saved_weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
saved_ema = ema.state_dict()
gate = threading.Event()
writer.submit(gate.wait)  # the disk is slow: nothing of step 2 is written until the gate opens
folder = checkpoint.save(engine, ema, root, 2, {"step": 2}, 2, meta, writer)
print(json.dumps({"returned": True, "complete": (folder / "COMPLETE").exists(), "busy": writer.status() == BUSY,
                  "latest": checkpoint.latest_complete(root)}), flush=True)
for _ in range(3):  # training goes on and changes every tensor the save handed over
    step()
if mode == "hang":
    gate.wait()  # the test kills this process here
gate.set()
writer.wait()
checkpoint.mark_complete(root, folder, 2, 2, meta)
engine.load_checkpoint(str(root), tag="step00000002", load_optimizer_states=True, load_lr_scheduler_states=True)
ema.load_state_dict(checkpoint._load_file(str(folder / checkpoint.ema_file(0))))
weights_equal = all(torch.equal(saved_weights[k], v) for k, v in engine.module.state_dict().items())
ema_equal = all(torch.equal(saved_ema[k], v) for k, v in ema.state_dict().items())
print(json.dumps({"idle": writer.status() == IDLE, "complete": (folder / "COMPLETE").exists(),
                  "latest": checkpoint.latest_complete(root), "weights_equal": weights_equal,
                  "ema_equal": ema_equal, "state": json.loads((folder / "state_rank000.json").read_text())}))
"""


def run_background_probe(tmp_path, mode):
    import subprocess
    import sys

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    return subprocess.Popen([sys.executable, "-c", BACKGROUND_PROBE, str(tmp_path / "checkpoints"), mode],
                            cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_background_checkpoint_is_the_saved_step_and_complete_only_once_written(tmp_path):
    """save() returns before anything is on disk; the next steps change every tensor; the
    files are still the saved step's, bitwise (weights, optimizer, EMA), and COMPLETE comes
    only after the writer finished."""
    import json

    probe = run_background_probe(tmp_path, "finish")
    out, err = probe.communicate(timeout=300)
    assert probe.returncode == 0, err[-3000:]
    during, after = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    assert during == {"returned": True, "complete": False, "busy": True, "latest": "step00000001"}
    assert after == {"idle": True, "complete": True, "latest": "step00000002", "weights_equal": True,
                     "ema_equal": True, "state": {"step": 2}}


def test_a_process_killed_while_its_checkpoint_is_written_resumes_from_the_one_before(tmp_path):
    import json
    import signal

    probe = run_background_probe(tmp_path, "hang")
    try:
        first = next(json.loads(line) for line in probe.stdout if line.startswith("{"))
        assert first["returned"] and not first["complete"]
        probe.send_signal(signal.SIGKILL)
        probe.wait(timeout=60)
    finally:
        if probe.poll() is None:
            probe.kill()
        probe.communicate()
    root = tmp_path / "checkpoints"
    assert (root / "step00000002").is_dir() and not (root / "step00000002/COMPLETE").exists()
    assert checkpoint.latest_complete(root) == "step00000001"


def test_a_failed_background_write_is_raised_by_status_and_wait():
    import errno

    from dist_diffusion.runtime.background import BUSY, FAILED, IDLE, BackgroundWriter

    writer = BackgroundWriter()
    assert writer.status() == IDLE
    ran = []

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    writer.submit(full_disk)
    writer.submit(lambda: ran.append(1))  # after a failure the rest of the checkpoint is not written
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    assert writer.status() == FAILED and ran == [] and BUSY not in (writer.status(),)


def test_a_host_copy_keeps_every_type_the_loaders_rely_on():
    """ZeRO-3's model states hold torch.Size shapes (DeepSpeed's zero_to_fp32 calls .numel()
    on them) and a module's state_dict its _metadata: a copy that rebuilt them as plain
    tuples and dicts broke `export --raw` of a ZeRO-3 run."""
    from collections import OrderedDict, namedtuple

    from dist_diffusion.runtime.background import host_copy

    weights = OrderedDict(w=torch.ones(2))
    weights._metadata = {"": {"version": 1}}
    Pair = namedtuple("Pair", "a b")
    state = {"param_shapes": [OrderedDict(w=torch.Size([2, 3]))], "module": weights, "pair": Pair(1, torch.zeros(1)),
             "groups": [{"lr": 0.1, "params": [0, 1]}], "tensors": (torch.arange(3),)}
    copied = host_copy(state)
    assert type(copied["param_shapes"][0]["w"]) is torch.Size and copied["param_shapes"][0]["w"].numel() == 6
    assert isinstance(copied["module"], OrderedDict) and copied["module"]._metadata == {"": {"version": 1}}
    assert type(copied["pair"]) is Pair and copied["pair"].b is not state["pair"].b
    state["groups"][0]["lr"] = 0.2  # the scheduler changes it in place after the save
    state["module"]["w"].add_(1)
    assert copied["groups"][0]["lr"] == 0.1 and torch.equal(copied["module"]["w"], torch.ones(2))
    assert torch.equal(copied["tensors"][0], torch.arange(3)) and copied["tensors"][0] is not state["tensors"][0]
