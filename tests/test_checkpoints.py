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
    ema = SimpleNamespace(sharded=sharded, state_dict=lambda: {"w": torch.full((2,), float(rank))})
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
    return SimpleNamespace(train=cfg.train, runtime=cfg.runtime, objective=SimpleNamespace(draws_grids=False), state=state, ema=SimpleNamespace(update=lambda decay: None), spec=None,
                           engine=None, env=SimpleNamespace(world_size=1, rank=0, is_main=True),
                           logger=SimpleNamespace(step=lambda *a: None, info=lambda *a: None,
                                                  flush_samples=lambda: None), on_checkpoint=None,
                           clock=lambda: now[0], last_save=0.0)


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
        return [values[0], 1]

    monkeypatch.setattr(loop, "max_each_over_ranks", other_rank_is_due)
    saves, now = [], [1000.0]
    run_loop(monkeypatch, timed_run(3, saves, now), now, minutes_per_step=0)  # this rank's clock stands still
    assert saves == [2, 4, 6, 8, 10, 12] and all(due == 0 for _, due in sent)
