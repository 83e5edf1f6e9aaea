"""A full disk while a checkpoint (or an export) is written: one line naming the path and the
last complete checkpoint, which stays the resume point; once there is room, the same command
resumes. The disk is a small tmpfs of the test's own (root mounts it), shrunk so that the
next checkpoint fills it mid-save."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_class_folders, run_dist_diffusion
from dist_diffusion.config import DataConfig

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a tmpfs: needs root")]

ARGS = ["vae.enabled=false", "data.resolution=16", "model.num_classes=4", "train.batch_size=16",
        "train.warmup_steps=2", "train.log_every=1", "data.num_workers=0", "train.ckpt_every=4",
        "runtime.zero_stage=2"]


@pytest.fixture
def disk(tmp_path):
    """A 64 MB tmpfs, unmounted whatever happens."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def resize(mount: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount)], check=True)


def used_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def train(run: Path, shards: Path, steps: int):
    return run_dist_diffusion(["train", "--config", "configs/tiny.yaml", "--nproc", "1", f"train.run_dir={run}",
                               f"data.shards={shards}", f"train.max_steps={steps}", *ARGS], timeout=600)


def test_checkpoint_on_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(tmp_path, disk):
    from dist_diffusion.data.prepare import prepare

    shards = tmp_path / "img16"
    prepare(make_class_folders(tmp_path / "src", classes=4, per_class=16), shards,
            DataConfig(resolution=16, samples_per_shard=32), progress=False)
    run = disk / "run"
    first = train(run, shards, 4)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = run / "checkpoints"
    one = tree_bytes(checkpoints / "step00000004")
    resize(disk, used_bytes(disk) + one // 2)  # room for the next steps' logs, half a checkpoint

    full = train(run, shards, 8)
    assert full.returncode == 2, full.stderr[-3000:]
    lines = full.stderr.strip().splitlines()
    assert "Traceback" not in full.stderr and lines[-1].startswith("error: "), full.stderr[-3000:]
    error = lines[-1]
    assert f"writing the checkpoint to {checkpoints / 'step00000008'} failed: no space left" in error, error
    assert "(ENOSPC)" in error and f"the last complete checkpoint, {checkpoints / 'step00000004'}" in error
    assert [line for line in lines if line.startswith("error")] == [error]
    assert not (checkpoints / "step00000008/COMPLETE").exists()  # a partial checkpoint is never complete
    assert (checkpoints / "latest").read_text() == "step00000004"

    resize(disk, 64 * 2**20)
    again = train(run, shards, 8)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step00000004'} at step 4" in again.stdout + again.stderr
    assert json.loads((checkpoints / "step00000008/COMPLETE").read_text())["step"] == 8

    # an export onto the full disk, and onto a path that is a file: one line each
    resize(disk, used_bytes(disk) + 4096)
    export = run_dist_diffusion(["export", "--run-dir", str(run), "--out", str(disk / "unet")], timeout=300)
    assert export.returncode == 2 and "Traceback" not in export.stderr, export.stderr[-3000:]
    assert "no space left on the device (ENOSPC)" in export.stderr and str(disk / "unet") in export.stderr
    assert len(export.stderr.strip().splitlines()) == 1, export.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    export = run_dist_diffusion(["export", "--run-dir", str(run), "--out", str(a_file)], timeout=300)
    assert export.returncode == 2 and "Traceback" not in export.stderr, export.stderr[-3000:]
    assert f"--out {a_file} is a file, not a directory" in export.stderr
