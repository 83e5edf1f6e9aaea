"""Sharded checkpoints: DeepSpeed writes every rank's model/optimizer shard; beside them
each rank writes its EMA (safetensors) and its state (step, data position). A checkpoint
becomes usable only when rank 0 has written ``COMPLETE`` after every rank finished, and
``latest`` is moved to it; so a crash mid-save leaves the previous one in charge.

Layout: RUN/checkpoints/step00000040/{DeepSpeed files, ema_rank000.safetensors,
state_rank000.json, ..., COMPLETE}, RUN/checkpoints/latest. The EMA is written once: by
rank 0 under ZeRO 0-2 (every rank holds the same copy), by every rank under ZeRO-3 (each
its own partitions).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..config import ConfigError

# torch.distributed, safetensors and the process group are imported by the functions that
# use them: stored_run_config runs in the launcher, before any rank, and stays torch-free.

COMPLETE = "COMPLETE"
# In a node-local run directory (Ray's worker nodes) rank 0's COMPLETE is on another disk:
# this marks the node's own share of a checkpoint that every rank finished, so the node can
# prune its old copies. It never makes a folder resumable (only COMPLETE does).
NODE_SAVED = "NODE_SAVED"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _barrier() -> None:
    from .distributed import barrier

    barrier()


def _save_file(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path)


def _load_file(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def ema_file(rank: int) -> str:
    """Rank ``rank``'s EMA tensors in a checkpoint folder (full copies, or its ZeRO-3 partitions)."""
    return f"ema_rank{rank:03d}.safetensors"


def profiles_file(rank: int) -> str:
    """Rank ``rank``'s post-hoc EMA profiles (train.ema.posthoc_sigma_rels), beside its EMA."""
    return f"posthoc_ema_rank{rank:03d}.safetensors"


def profile_key(sigma_rel: float) -> str:
    """How a profile's tensors are named in checkpoints and snapshots: <key>/<parameter>."""
    return f"sigma_rel_{sigma_rel:g}"


SNAPSHOTS = "ema_snapshots"  # RUN/ema_snapshots/stepNNNNNNNN: profiles that outlive their checkpoint


def writes_ema(rank: int, sharded: bool) -> bool:
    """Whether this rank writes an EMA file: every rank its own partitions under ZeRO-3;
    under ZeRO 0-2 every rank holds the same full copy, so rank 0 alone writes it."""
    return sharded or rank == 0


def ema_files(folder: Path) -> list[str]:
    """The EMA files of a complete checkpoint, in rank order: one per rank under ZeRO-3,
    else rank 0's full copy (checkpoints from before kept one copy per rank: the first will do)."""
    meta = json.loads((folder / COMPLETE).read_text())
    return [ema_file(r) for r in range(meta["world_size"] if meta.get("zero_stage") == 3 else 1)]


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def save(engine, ema, root: Path, step: int, state: dict, keep_last: int, meta: dict, writer=None) -> Path:
    """Checkpoint ``step`` (every rank calls it). Without ``writer``: written and marked
    complete before it returns. With a BackgroundWriter (runtime.background): this rank's
    parts are host copies handed to it, and the caller marks the folder complete
    (:func:`mark_complete`) once every rank's writer is idle."""
    folder = write_parts(engine, ema, root, step, state, writer)
    if writer is None:
        _barrier()  # every shard of every rank is on disk
        mark_complete(root, folder, step, keep_last, meta)
    return folder


def write_parts(engine, ema, root: Path, step: int, state: dict, writer=None) -> Path:
    """This rank's share of checkpoint ``step``: DeepSpeed's shards, its EMA file (see
    :func:`writes_ema`) and its state."""
    rank, tag = _rank(), tag_for(step)
    # universal_checkpoint_info: lets ds_to_universal reshard this checkpoint for another world size
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "universal_checkpoint_info": {}},
                           save_latest=False)
    folder = root / tag
    writes = writes_ema(rank, ema.sharded)
    tensors = {ema_file(rank): ema.state_dict() if writes else None,
               profiles_file(rank): ema.profiles_state_dict() if writes and ema.sigma_rels else None}
    state_path = folder / f"state_rank{rank:03d}.json"
    if writer is None:
        for name, values in tensors.items():
            if values is not None:
                _save_file(values, str(folder / name))
        state_path.write_text(json.dumps(state))
        return folder
    from .background import fsync_file, host_copy

    for name, values in tensors.items():
        if values is not None:
            _submit_tensors(writer, host_copy(values), folder / name)
    writer.submit(lambda: (state_path.write_text(json.dumps(state)), fsync_file(state_path), fsync_file(folder)))
    return folder


def _submit_tensors(writer, values: dict, path: Path) -> None:
    from .background import fsync_file

    writer.submit(lambda: (_save_file(values, str(path)), fsync_file(path)))


def mark_complete(root: Path, folder: Path, step: int, keep_last: int, meta: dict) -> None:
    """Once every rank's parts of ``folder`` are on disk: rank 0 writes COMPLETE (synced, so
    a machine that crashes after it never resumes from a folder whose marker outlived its
    files), moves ``latest`` and prunes; then each node prunes its own copies."""
    from .background import fsync_file

    rank = _rank()
    if rank == 0:
        (folder / COMPLETE).write_text(json.dumps({"step": step, **meta}, indent=2))
        fsync_file(folder / COMPLETE)
        fsync_file(folder)
        _atomic_write(root / "latest", folder.name)
        _prune(root, keep_last)
    _barrier()
    if rank != 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        prune_node_local(root, folder, keep_last)


def prune_node_local(root: Path, folder: Path, keep_last: int) -> None:
    """A node's local rank 0 prunes its own copies when its run directory is not rank 0's
    (rank 0's COMPLETE is not there). On a shared directory rank 0 prunes, and this does
    nothing, so two nodes never delete in one directory. Called after the barrier that
    follows rank 0's COMPLETE: ``folder`` is complete everywhere."""
    if (folder / COMPLETE).exists():
        return
    (folder / NODE_SAVED).write_text("")
    _prune(root, keep_last, marks=(COMPLETE, NODE_SAVED))


def latest_complete(root: Path) -> str | None:
    """The newest tag with a COMPLETE marker (incomplete, newer ones are ignored)."""
    if not root.is_dir():
        return None
    tags = sorted((p.name for p in root.iterdir() if (p / COMPLETE).is_file()), reverse=True)
    return tags[0] if tags else None


def stored_run_config(run_dir: Path) -> str | None:
    """The config.yaml of a run directory that holds a complete checkpoint (None: nothing to
    resume, so any config may start there). A run directory that is a file is refused."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir={run_dir} is a file, not a directory; choose another train.run_dir")
    stored = run_dir / "config.yaml"
    if not stored.is_file() or latest_complete(run_dir / "checkpoints") is None:
        return None
    return stored.read_text()


def saved_world_size(root: Path, tag: str) -> int:
    return json.loads((root / tag / COMPLETE).read_text())["world_size"]


def load(engine, ema, root: Path, tag: str, world_size: int) -> list[dict]:
    """Restore engine (weights, optimizer, LR schedule) and EMA; returns the per-rank states
    the checkpoint holds: this rank's alone, or, when the world size changed (elastic
    resume through DeepSpeed's universal checkpoint), every old rank's."""
    rank, old_world = _rank(), saved_world_size(root, tag)
    if old_world == world_size:
        engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        files = ema_files(root / tag)
        mine = rank if len(files) > 1 else 0
        ema.load_state_dict(_load_file(str(root / tag / files[mine])))
        if ema.sigma_rels:
            ema.load_profiles(_load_file(str(_profiles_path(root / tag, mine))))
        return [json.loads((root / tag / f"state_rank{rank:03d}.json").read_text())]
    universal = _to_universal(root, tag)
    engine.load_checkpoint(str(root), tag=universal, load_optimizer_states=True, load_lr_scheduler_states=True)
    old = [_load_file(str(root / tag / name)) for name in ema_files(root / tag)]
    ema.load_resharded(old, rank, world_size)
    if ema.sigma_rels:
        profiles = [_load_file(str(_profiles_path(root / tag, r))) for r in range(len(old))]
        for sigma_rel in ema.sigma_rels:
            ema.load_resharded(profiles, rank, world_size, prefix=profile_key(sigma_rel))
    return [json.loads((root / tag / f"state_rank{r:03d}.json").read_text()) for r in range(old_world)]


def _profiles_path(folder: Path, rank: int) -> Path:
    """A checkpoint's profiles file of ``rank``, or one line: the run tracks profiles this
    checkpoint lacks (turned on mid-run: a profile must average from step 1)."""
    path = folder / profiles_file(rank)
    if not path.is_file():
        raise ConfigError(f"{folder} has no post-hoc EMA profiles, but train.ema.posthoc_sigma_rels asks for them: "
                          f"a profile averages from step 1 and cannot start mid-run; resume without them or "
                          f"start a new train.run_dir")
    return path


def save_snapshot(root: Path, folder: Path, step: int, ema, meta: dict) -> Path:
    """RUN/ema_snapshots/<tag>: the complete checkpoint ``folder``'s profile files (hard links,
    so no byte is written twice, and they outlive the checkpoint when it is pruned), then
    rank 0's COMPLETE with the profiles' widths and exponents. Every rank calls it."""
    rank = _rank()
    dest = root.parent / SNAPSHOTS / folder.name
    dest.mkdir(parents=True, exist_ok=True)
    if writes_ema(rank, ema.sharded):
        name = profiles_file(rank)
        (dest / name).unlink(missing_ok=True)
        try:
            os.link(folder / name, dest / name)
        except OSError:  # a file system without hard links
            shutil.copyfile(folder / name, dest / name)
    _barrier()
    if rank == 0:
        record = {"step": step, **meta, "sigma_rels": list(ema.sigma_rels), "gammas": list(ema.gammas)}
        _atomic_write(dest / COMPLETE, json.dumps(record, indent=2))
    return dest


def _to_universal(root: Path, tag: str) -> str:
    """Convert once with DeepSpeed's converter: rank 0 first, then the local rank 0 of any
    machine that cannot see its result (a run directory on node-local disk) converts its
    own copy. Two machines converting into one shared directory at once broke the files."""
    universal = f"{tag}_universal"
    for converts in (_rank() == 0, int(os.environ.get("LOCAL_RANK", 0)) == 0):
        if converts and not (root / universal / "zero").is_dir():
            _convert(root, tag, universal)
        _barrier()
    return universal


def _convert(root: Path, tag: str, universal: str) -> None:
    """ds_to_universal into a private folder, then renamed into place: a reader sees the
    whole result or nothing."""
    import socket
    import subprocess
    import sys

    staging = root / f"{universal}.{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(root / tag), "--output_folder", str(staging)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"DeepSpeed could not convert {root / tag} for a resume on another process count: "
                           f"{done.stderr.strip()[-1500:]}")
    shutil.rmtree(root / universal, ignore_errors=True)  # a partial one from an older version
    os.replace(staging, root / universal)


def upload(root: Path, tag: str, url: str, rank: int, world_size: int) -> None:
    """Copy a complete local checkpoint to ``url``: the ranks share the files, then rank 0
    uploads COMPLETE last, so a reader never sees a partial checkpoint as complete."""
    upload_share(root, tag, url, rank, world_size)
    _barrier()
    upload_marker(root, tag, url, rank)
    _barrier()


def upload_share(root: Path, tag: str, url: str, rank: int, world_size: int) -> None:
    """This rank's share of a complete local checkpoint's files (all but COMPLETE)."""
    from ..data import storage

    folder, dest = root / tag, storage.parse(url).join(tag)
    files = sorted(p.name for p in folder.iterdir() if p.name != COMPLETE)
    for name in files[rank::world_size]:
        storage.put_file(folder / name, dest.join(name))


def upload_marker(root: Path, tag: str, url: str, rank: int) -> None:
    """COMPLETE, by rank 0, after every rank's share is uploaded."""
    from ..data import storage

    if rank == 0:
        storage.put_file(root / tag / COMPLETE, storage.parse(url).join(tag).join(COMPLETE))


def download_latest(url: str, root: Path, local_rank: int) -> str | None:
    """Fetch the newest complete checkpoint under ``url`` into ``root`` (once per machine)."""
    from ..data import storage

    prefix = storage.parse(url)
    tags = sorted({n.split("/")[0] for n in storage.list_names(prefix) if n.endswith("/" + COMPLETE)})
    if tags and local_rank == 0 and not (root / tags[-1] / COMPLETE).exists():
        names = [n for n in storage.list_names(prefix.join(tags[-1]))]
        for name in sorted(names, key=lambda n: n == COMPLETE):  # the marker last
            storage.get_file(prefix.join(tags[-1]).join(name), root / tags[-1] / name)  # GBs: streamed
    _barrier()
    return tags[-1] if tags else None


def consolidated_fp32_state(root: Path, tag: str) -> dict:
    """The trained (non-EMA) fp32 weights of any ZeRO stage, joined offline by DeepSpeed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def _prune(root: Path, keep_last: int, marks: tuple[str, ...] = (COMPLETE,)) -> None:
    """Keep the newest keep_last complete checkpoints (a folder holding one of ``marks``);
    drop older ones and the debris of saves that never completed. Nothing newer than the
    newest kept one is touched (a save may be under way there), and a folder that vanishes
    meanwhile (another node pruning a shared directory) is no error."""
    tags = sorted((p for p in root.iterdir() if p.is_dir()), reverse=True)
    complete = [p for p in tags if any((p / mark).is_file() for mark in marks)]
    kept = complete[:keep_last]
    for old in tags:
        if kept and old not in kept and old.name < kept[0].name:
            shutil.rmtree(old, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
