"""Runs end the ways users and schedulers end them: a signal to the whole process group
(``timeout``, ``docker stop``, systemd, ``scancel``, SLURM's preemption), and Ctrl-C.

Each run is `dist-diffusion train --nproc 2` with 2 DataLoader workers per rank, started in
a session of its own (``setsid``) and signalled as a group, as a terminal or a scheduler
does; the loader workers get the signal too."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import logged_steps, make_class_folders, run_dist_diffusion, wait_until
from dist_diffusion.config import DataConfig

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["vae.enabled=false", "data.resolution=16", "model.num_classes=4", "train.batch_size=16",
        "train.warmup_steps=2", "train.lr=2e-3", "train.log_every=1", "data.num_workers=2",
        "train.preempt_check_every=2", "train.ckpt_every=1000", "runtime.zero_stage=2"]
STEPS = 30  # long enough that the signal, sent after the 3rd step, lands mid-run


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from dist_diffusion.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("signals")
    src = make_class_folders(tmp / "src", classes=4, per_class=40)
    prepare(src, tmp / "img16", DataConfig(resolution=16, samples_per_shard=20), progress=False)
    return tmp / "img16"


def args_for(run: Path, shards: Path, steps: int = STEPS) -> list[str]:
    return ["train", "--config", "configs/tiny.yaml", "--nproc", "2", f"train.run_dir={run}",
            f"data.shards={shards}", f"train.max_steps={steps}", *ARGS]


def start_group(run: Path, shards: Path) -> subprocess.Popen:
    """The launcher as a user starts it, leader of a new session and process group."""
    return subprocess.Popen([sys.executable, "-m", "dist_diffusion.cli", *args_for(run, shards)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def group_members(pgid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def signal_group_mid_run(proc: subprocess.Popen, run: Path, signum: int, again_after: float | None = None,
                         members: int = 1 + 2 + 2 * 2):
    """Wait for the 3rd logged step, signal the whole group (twice, with ``again_after``
    seconds between, for a second Ctrl-C); returns (exit code, stdout, stderr)."""
    try:
        wait_until(lambda: len(logged_steps(run)) >= 3 or proc.poll() is not None, 300, "the 3rd step",
                   interval=0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        # the launcher, 2 ranks and every rank's loader workers are up: all are signalled
        assert len(group_members(proc.pid)) >= members, group_members(proc.pid)
        os.killpg(proc.pid, signum)
        if again_after is not None:
            time.sleep(again_after)
            os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def assert_group_gone(pgid: int) -> None:
    """No process of the group is left: the ranks ended their loader workers."""
    wait_until(lambda: not group_members(pgid), 30, f"process group {pgid} to end", interval=0.2)


def complete_steps(run: Path) -> list[int]:
    return sorted(json.loads((p / "COMPLETE").read_text())["step"] for p in (run / "checkpoints").iterdir()
                  if (p / "COMPLETE").exists())


def test_sigterm_to_the_group_saves_exits_124_and_resumes_exactly(tmp_path, shards):
    straight = run_dist_diffusion(args_for(tmp_path / "straight", shards), timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "stopped"
    proc = start_group(run, shards)
    code, out, err = signal_group_mid_run(proc, run, signal.SIGTERM)
    assert code == 124, err[-3000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err, err[-3000:]
    assert_group_gone(proc.pid)
    (step,) = complete_steps(run)
    assert 3 <= step < STEPS and f"preempted at step {step}: checkpoint saved" in out + err
    assert json.loads((run / "REQUEUE").read_text())["step"] == step

    resumed = run_dist_diffusion(args_for(run, shards), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout + resumed.stderr
    a, b = tmp_path / "straight/checkpoints", run / "checkpoints"
    final = f"step{STEPS:08d}"
    for name in sorted(p.name for p in (a / final).glob("*.safetensors")):  # EMA of every rank, bitwise
        ta, tb = load_file(str(a / final / name)), load_file(str(b / final / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert logged_losses(tmp_path / "straight")[step:] == logged_losses(run)[step:]


def logged_losses(run: Path) -> list[float]:
    """The loss of each step, the last record of it (a resumed run logs its steps again)."""
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            by_step[row["step"]] = row["loss"]
    return [by_step[s] for s in sorted(by_step)]


def test_ctrl_c_stops_at_a_step_boundary_with_one_line(tmp_path, shards):
    run = tmp_path / "run"
    proc = start_group(run, shards)
    code, out, err = signal_group_mid_run(proc, run, signal.SIGINT)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert_group_gone(proc.pid)
    (step,) = complete_steps(run)
    line = f"stopped by Ctrl-C at step {step} (checkpoint of step {step} saved); rerun the same command to resume"
    assert line in out + err, (out + err)[-3000:]
    assert not (run / "REQUEUE").exists()  # a person stopped it: nothing to requeue


def test_a_second_ctrl_c_stops_at_once(tmp_path, shards):
    run = tmp_path / "run"
    proc = start_group(run, shards)
    code, out, err = signal_group_mid_run(proc, run, signal.SIGINT, again_after=0.05)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert_group_gone(proc.pid)
    assert complete_steps(run) == [] if (run / "checkpoints").exists() else True


def weed_servers_under(root: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "weed" in cmdline and str(root) in cmdline:
            found.append(proc.pid)
    return found


@pytest.mark.timeout(900)
def test_ctrl_c_stops_the_demo_its_ranks_and_its_s3_server(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "dist_diffusion.demo", "--out", str(out), "--classifier-steps",
                             "5000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        code, stdout, stderr = signal_group_mid_run(proc, out / "classifier", signal.SIGINT, members=3)
    finally:
        for pid in weed_servers_under(out):  # only if the demo failed to: the test must not orphan it
            os.killpg(pid, signal.SIGKILL)
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: stopped by Ctrl-C"), stderr[-2000:]
    assert "[stack down]" in stdout
    assert_group_gone(proc.pid)
    assert weed_servers_under(out) == []


def sample_argv(models: Path, out: Path) -> list[str]:
    from conftest import PIXEL16

    return ["sample", "--config", "configs/tiny.yaml", "--nproc", "2", *PIXEL16, f"eval.unet={models / 'unet'}",
            f"eval.out={out}", "sample.num_samples=128", "eval.samples_per_shard=8", "sample.batch_size=8",
            "sample.steps=20", "eval.guidance_scales=[3]"]


def shard_images(tar_path: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_ctrl_c_stops_sampling_at_a_shard_boundary_and_the_same_command_resumes(tmp_path, random_models):
    """`dist-diffusion sample --nproc 2`: each rank finishes the shard it is writing, the
    finished shards are kept, and the rerun reuses them (its images equal a straight run's)."""
    out = tmp_path / "samples"
    argv = sample_argv(random_models, out)
    proc = subprocess.Popen([sys.executable, "-m", "dist_diffusion.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    point = out / "cfg3_steps20"
    try:
        wait_until(lambda: len(list(point.glob("samples-*.npz"))) >= 2 or proc.poll() is not None, 300,
                   "the first shards", interval=0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "stopped by Ctrl-C after shard" in stdout + stderr, stderr[-3000:]
    assert_group_gone(proc.pid)
    kept = sorted(p.name for p in point.glob("samples-*.npz"))
    assert 2 <= len(kept) < 16, kept  # 16 shards in all: the stop came mid-job

    resumed = run_dist_diffusion(argv, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(list(point.glob("samples-*.npz"))) == 16
    straight = run_dist_diffusion(sample_argv(random_models, tmp_path / "straight"), timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for name in [kept[0], "samples-000015.npz"]:  # a kept shard and one written after the resume
        tar = name.replace(".npz", ".tar")
        assert shard_images(point / tar) == shard_images(tmp_path / "straight/cfg3_steps20" / tar), tar
