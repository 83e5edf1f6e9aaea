"""A real single-node SLURM (munged, MariaDB + slurmdbd, slurmctld, slurmd) started by
infra/local/slurm.sh: sbatch, preemption + requeue, and submitit, all training for real."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import json

from conftest import PIXEL16, eval_overrides, lift_requeue_backoff, logged_steps, sbatch_and_wait, wait_until

ROOT = Path(__file__).resolve().parents[1]
# This node has 2 cores and no GPU: override the GPU-cluster header of train_latent.sh.
SMALL_NODE = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
# One task with both cores: SLURM 22.05 to 23.02's srun would give it one of them.
ONE_TASK_TWO_CPUS = ["--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2"]
# A preempted run: long enough that the signal, sent after its 3rd step, arrives well
# before its end; its periodic checkpoint (every CKPT_EVERY) is not where it stops.
STEPS, CKPT_EVERY = 80, 50


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, pixel_shards):
    """The cluster for this module; `down` runs whatever happened, stopping it by PID. Task
    affinity is on, as on production clusters: each task may run only on its own cores."""
    if shutil.which("slurmctld") is None:
        pytest.fail("SLURM is not installed: run `make system-deps` (Debian slurm-wlm, munge, mariadb)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_STACK_DIR": str(state), "SLURM_TASK_PLUGIN": "task/affinity"}
    script = str(ROOT / "infra/local/slurm.sh")
    try:
        up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        again = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "slurm stack up" in again.stdout  # idempotent
        yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run([script, "down"], env=env, capture_output=True, timeout=120)


def job_state(env, job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], env=env,
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip().split("\n")[-1].split(" ")[0] if out.returncode == 0 else ""


def squeue_reason(env, job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"], env=env, capture_output=True, text=True,
                         timeout=30)
    return out.stdout.strip()


def train_job(log, run, shards, steps: int, ckpt_every: int, node: list[str] = SMALL_NODE) -> list[str]:
    """sbatch's arguments for slurm/train_latent.sh on the tiny pixel recipe, sized for this node."""
    return [*node, f"--output={log}", "slurm/train_latent.sh", "configs/tiny.yaml", *PIXEL16,
            f"train.max_steps={steps}", f"train.ckpt_every={ckpt_every}", f"train.run_dir={run}", f"data.shards={shards}"]


def test_sbatch_trains_with_two_tasks(slurm, tmp_path, pixel_shards):
    run, log = tmp_path / "run", tmp_path / "job.out"
    out = sbatch_and_wait(train_job(log, run, pixel_shards, steps=8, ckpt_every=4), slurm, timeout=400)
    assert out.returncode == 0, out.stderr + log.read_text(errors="replace")[-3000:]
    assert "2 tasks" in log.read_text(errors="replace")
    assert (run / "checkpoints/step00000008/COMPLETE").exists()
    assert logged_steps(run) == list(range(1, 9))
    cpus = [set(host["cpu_affinity"]) for host in rank_hosts(run)]
    assert [len(c) for c in cpus] == [1, 1] and cpus[0].isdisjoint(cpus[1]), cpus  # a core each


def rank_hosts(run) -> list[dict]:
    """What each rank recorded about where it ran (RUN/hosts/rankNNN.json), by rank."""
    return [json.loads(p.read_text()) for p in sorted((run / "hosts").glob("rank*.json"))]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a node of 2 CPUs")
def test_train_rank_is_bound_to_its_cpus_per_task(slurm, tmp_path, pixel_shards):
    run, log = tmp_path / "run", tmp_path / "job.out"
    out = sbatch_and_wait(train_job(log, run, pixel_shards, steps=2, ckpt_every=2, node=ONE_TASK_TWO_CPUS), slurm,
                          timeout=400)
    assert out.returncode == 0, out.stderr + log.read_text(errors="replace")[-3000:]
    [host] = rank_hosts(run)
    assert len(host["cpu_affinity"]) == 2, host  # not the one CPU srun gives a task by default


def affinity_recording_python(tmp_path) -> tuple[Path, Path]:
    """A python for the sbatch scripts (DD_PYTHON) that runs as python in the batch step
    and, in the job step srun starts, records the CPUs each task may use instead."""
    out = tmp_path / "affinity"
    out.mkdir()
    wrapper = tmp_path / "python-recording-affinity"
    record = "import json, os; print(json.dumps(sorted(os.sched_getaffinity(0))))"
    wrapper.write_text(f"#!/bin/sh\nif [ -n \"${{SLURM_STEP_ID:-}}\" ]; then\n"
                       f"  exec {sys.executable} -c '{record}' > {out}/task$SLURM_PROCID.json\nfi\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper, out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a node of 2 CPUs")
@pytest.mark.parametrize("script", ["slurm/train_latent.sh", "slurm/sample_fid.sh"])
@pytest.mark.parametrize("node", [ONE_TASK_TWO_CPUS, SMALL_NODE], ids=["1x2", "2x1"])
def test_sbatch_scripts_give_each_task_its_cpus_per_task(slurm, tmp_path, pixel_shards, random_models, script, node):
    python, out = affinity_recording_python(tmp_path)
    log = tmp_path / "job.out"
    args = eval_overrides(random_models, tmp_path / "eval", pixel_shards) if "sample" in script else []
    done = sbatch_and_wait([*node, f"--output={log}", script, "configs/tiny.yaml", *args],
                           {**slurm, "DD_PYTHON": str(python)}, timeout=120)
    assert done.returncode == 0, done.stderr + log.read_text(errors="replace")[-3000:]
    tasks, cpus_per_task = (1, 2) if node is ONE_TASK_TWO_CPUS else (2, 1)
    cpus = [set(json.loads(p.read_text())) for p in sorted(out.glob("task*.json"))]
    assert [len(c) for c in cpus] == [cpus_per_task] * tasks, cpus
    assert len(set().union(*cpus)) == tasks * cpus_per_task  # no two tasks on one core


def exit_code_masking_python(tmp_path) -> Path:
    """A python that turns exit code 124 into 1, as torchrun does."""
    wrapper = tmp_path / "python-like-torchrun"
    wrapper.write_text(f"#!/bin/sh\n{sys.executable} \"$@\"\nstatus=$?\n"
                       f"[ $status -eq 124 ] && exit 1\nexit $status\n")
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.parametrize("python", ["plain", "masks-124"])
def test_usr1_saves_requeues_and_resumes(slurm, tmp_path, pixel_shards, python):
    run, log = tmp_path / "run", tmp_path / "job.out"
    if python == "masks-124":  # the requeue must not hang on the exit code alone
        slurm = {**slurm, "DD_PYTHON": str(exit_code_masking_python(tmp_path))}
    job_args = train_job(log, run, pixel_shards, steps=STEPS, ckpt_every=CKPT_EVERY)
    out = subprocess.run(["sbatch", "--parsable", *job_args], cwd=ROOT, env=slurm, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    try:
        wait_until(lambda: len(logged_steps(run)) >= 3, 300, "the job's first steps")
        subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True, timeout=30)
        wait_until(lambda: log.exists() and "requeueing" in log.read_text(errors="replace"), 120, "the requeue")
        # A requeued job waits ~2 min (reason BeginTime) before it may start again; a real
        # cluster keeps that back-off, the test lifts it once the job is back in the queue.
        wait_until(lambda: squeue_reason(slurm, job) == "BeginTime", 60, "the job to be requeued")
        lift_requeue_backoff(slurm, job)
        wait_until(lambda: job_state(slurm, job) == "COMPLETED", 400, f"job {job} to complete")
    finally:
        subprocess.run(["scancel", job], env=slurm, capture_output=True, timeout=30)
    text = log.read_text(errors="replace")
    preempted_at = int(text.split("preempted at step ")[1].split(":")[0])
    assert 3 <= preempted_at < STEPS, text[-3000:]
    assert f"resumed from {run / 'checkpoints'}/step{preempted_at:08d} at step {preempted_at}" in text
    assert "(restart 1)" in text
    # every step exactly once: nothing after the preemption checkpoint was lost or redone
    assert logged_steps(run) == list(range(1, STEPS + 1))


def test_submitit_two_tasks_returns_final_step(slurm, tmp_path, pixel_shards):
    out = subprocess.run([sys.executable, "launchers/submitit_slurm.py", "configs/tiny.yaml", *PIXEL16,
                          "train.max_steps=6", f"train.run_dir={tmp_path / 'run'}", f"data.shards={pixel_shards}",
                          "launch.workers_per_node=2", f"launch.job_dir={tmp_path / 'submitit'}"],
                         cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"step": 6' in out.stdout.strip().splitlines()[-1]


def test_submitit_preemption_saves_requeues_and_finishes(slurm, tmp_path, pixel_shards):
    run, jobs = tmp_path / "run", tmp_path / "submitit"
    proc = subprocess.Popen([sys.executable, "launchers/submitit_slurm.py", "configs/tiny.yaml", *PIXEL16,
                             f"train.max_steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", f"train.run_dir={run}",
                             f"data.shards={pixel_shards}", "launch.workers_per_node=2", "launch.signal_delay_s=60",
                             f"launch.job_dir={jobs}"], cwd=ROOT, env=slurm, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        job = wait_until(lambda: next((p.name.split("_")[0] for p in jobs.glob("*_submitted.pkl")), None), 60,
                         "the submitted job")
        wait_until(lambda: len(logged_steps(run)) >= 3, 300, "the job's first steps")
        # what SLURM sends signal_delay_s before the time limit, or on preemption
        subprocess.run(["scancel", "--signal=USR2", job], env=slurm, check=True, timeout=30)
        wait_until(lambda: squeue_reason(slurm, job) == "BeginTime", 120, "the job to be requeued")
        lift_requeue_backoff(slurm, job)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        proc.kill()
        subprocess.run(["scancel", job], env=slurm, capture_output=True, timeout=30)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert f'"step": {STEPS}' in stdout.strip().splitlines()[-1]
    logs = "".join(p.read_text(errors="replace") for p in jobs.glob(f"{job}_0_log.*"))
    preempted_at = int(logs.split("preempted at step ")[1].split(":")[0])
    assert f"at step {preempted_at}" in logs.split("resumed from ")[1]
    assert logged_steps(run) == list(range(1, STEPS + 1))


def test_bad_input_fails_before_any_worker(slurm, tmp_path):
    missing = subprocess.run([sys.executable, "launchers/submitit_slurm.py", "configs/nope.yaml"], cwd=ROOT,
                             env=slurm, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "configs/nope.yaml does not exist" in missing.stderr
    partition = subprocess.run([sys.executable, "launchers/submitit_slurm.py", "configs/tiny.yaml",
                                "launch.partition=gpu-h100", f"launch.job_dir={tmp_path}"], cwd=ROOT, env=slurm,
                               capture_output=True, text=True, timeout=60)
    assert partition.returncode == 2, partition.stderr
    assert "launch.partition='gpu-h100' is not a partition" in partition.stderr and "debug" in partition.stderr
    assert not list(tmp_path.iterdir())  # nothing was submitted


def test_sample_fid_job_with_two_tasks(slurm, tmp_path, pixel_shards, random_models):
    out, log = tmp_path / "eval", tmp_path / "job.out"
    done = sbatch_and_wait([*SMALL_NODE, f"--output={log}", "slurm/sample_fid.sh", "configs/tiny.yaml",
                            *eval_overrides(random_models, out, pixel_shards)], slurm, timeout=400)
    assert done.returncode == 0, done.stderr + log.read_text(errors="replace")[-3000:]
    assert "2 sampling tasks" in log.read_text(errors="replace")
    result = json.loads((out / "report.json").read_text())["results"][0]
    assert result["num_samples"] == 16 and result["resumed_shards"] == 0


def test_submitit_local_two_tasks_are_two_distinct_ranks(tmp_path, pixel_shards):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "launchers/submitit_slurm.py", "--local", "configs/tiny.yaml", *PIXEL16,
                          "train.max_steps=4", f"train.run_dir={run}", f"data.shards={pixel_shards}",
                          "launch.workers_per_node=2", f"launch.job_dir={tmp_path / 'submitit'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"step": 4' in out.stdout.strip().splitlines()[-1]
    records = {p.name: p.read_text().splitlines() for p in run.glob("samples_rank*.jsonl")}
    assert sorted(records) == ["samples_rank000.jsonl", "samples_rank001.jsonl"]
    keys = [set(json.loads(line)["keys"]) for lines in records.values() for line in lines[:1]]
    assert keys[0].isdisjoint(keys[1])  # each rank its own half of the batch
    assert json.loads((run / "checkpoints/step00000004/COMPLETE").read_text())["world_size"] == 2


def test_sbatch_evaluates_beside_training_in_a_companion_job(slurm, tmp_path, pixel_shards, random_models):
    """eval.during_training under sbatch: train_latent.sh submits the watcher as a job of its
    own (here it waits for the training job's cores, as on a full cluster) and marks the run
    ended; the companion evaluates every checkpoint, draws the curve, names the best, ends."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    beside = ["eval.during_training=true", f"eval.classifier={random_models / 'classifier'}",
              f"eval.reference={pixel_shards}", "sample.num_samples=8", "eval.samples_per_shard=4",
              "sample.batch_size=4", "sample.steps=4", "eval.guidance_scales=[3]", "train.keep_last=5", "eval.cpus=1"]
    out = sbatch_and_wait(train_job(log, run, pixel_shards, steps=8, ckpt_every=4) + beside, slurm, timeout=400)
    assert out.returncode == 0, out.stderr + log.read_text(errors="replace")[-3000:]
    companion = f"dd-eval-beside-{out.stdout.strip().split(';')[0]}"

    def companion_state() -> str:
        listed = subprocess.run(["sacct", "-n", "-X", "-P", "--name", companion, "-o", "State"], env=slurm,
                                capture_output=True, text=True, timeout=30)
        return listed.stdout.strip().split("\n")[-1].split(" ")[0]

    state = wait_until(lambda: (s := companion_state()) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and s,
                       400, f"the companion job {companion} to end")
    logs = "".join(p.read_text(errors="replace") for p in (run / "eval").glob("slurm-*.out"))
    assert state == "COMPLETED", logs[-3000:]
    assert (run / "eval/TRAINING_ENDED").exists()
    assert sorted(p.parent.name for p in (run / "eval").glob("step-*/report.json")) == ["step-000004", "step-000008"]
    best = json.loads((run / "eval/best.json").read_text())
    assert best["step"] in (4, 8) and (run / "eval/curve.png").is_file()
