"""A real local Ray head (infra/local/ray.sh) and `ray job submit` of the Ray Train
launcher: DeepSpeed in 2 Ray workers, checkpoints in Ray Train's storage, and a
restart from that storage after a worker is killed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import PIXEL16, eval_overrides, logged_steps, net_namespace, wait_until

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, pixel_shards):
    """A head on loopback whose workers see the test S3 (the env is set by s3_server)."""
    state = tmp_path_factory.mktemp("ray")
    # 3 CPUs: 2 training workers and the evaluator beside them (eval.during_training)
    env = {**os.environ, "RAY_STACK_DIR": str(state), "RAY_NUM_CPUS": "3"}
    script = str(ROOT / "infra/local/ray.sh")
    try:
        up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        address = (state / "env.sh").read_text().split("RAY_ADDRESS=")[1].strip()
        yield {**env, "RAY_ADDRESS": address, "GCS_ADDRESS": (state / "gcs_address").read_text().strip()}
    finally:
        subprocess.run([script, "down"], env=env, capture_output=True, timeout=120)


def submit(env, args, wait=True, job_id=None):
    named = ["--submission-id", job_id] if job_id else []
    cmd = [RAY, "job", "submit", "--working-dir", ".", *named, *([] if wait else ["--no-wait"]), "--",
           "python", "launchers/ray_train.py", "configs/tiny.yaml", *PIXEL16, "launch.workers_per_node=2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def job_status(env, job_id) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(env["RAY_ADDRESS"]).get_job_status(job_id).value)


def test_ray_job_trains_and_stores_checkpoints(ray_head, tmp_path, pixel_shards):
    run = tmp_path / "run"
    out = submit(ray_head, ["train.max_steps=6", "train.ckpt_every=3", f"train.run_dir={run}",
                            f"data.shards={pixel_shards}", "launch.max_failures=0"])
    assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"step": 6, "checkpoint"')))
    stored = Path(summary["checkpoint"])
    assert stored.parent.parent == run / "ray" and (stored / "COMPLETE").exists()
    assert {p.name for p in stored.iterdir()} >= {"ema_rank000.safetensors", "state_rank000.json",
                                                 "state_rank001.json"}
    assert logged_steps(run) == list(range(1, 7))


def ray_train_workers():
    """This head's Ray Train workers: those on loopback, in this process's network namespace
    (the 2-node cluster's, which another xdist worker may be running, are in their own)."""
    ours = net_namespace()
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
            and net_namespace(p.pid) == ours]


def test_killed_worker_restarts_from_ray_checkpoint(ray_head, tmp_path, pixel_shards):
    run, job = tmp_path / "run", f"dd-kill-{os.getpid()}"
    out = submit(ray_head, ["train.max_steps=60", "train.ckpt_every=20", f"train.run_dir={run}",
                            f"data.shards={pixel_shards}", "launch.max_failures=1"], wait=False, job_id=job)
    assert out.returncode == 0, out.stderr
    try:
        # From a step marker, not from time: once a step after the first stored checkpoint is
        # logged, freeze the workers, check they are still short of the next checkpoint, and
        # kill one. Steps 21.. then surely run twice after the restart from step 20.
        wait_until(lambda: (run / "ray/run/step00000020/COMPLETE").exists() and max(logged_steps(run), default=0) >= 22,
                   300, "a step after the first stored checkpoint", interval=0.02)
        victims = wait_until(ray_train_workers, 30, "the Ray Train workers")
        for victim in victims:
            victim.suspend()
        assert max(logged_steps(run)) < 40, "froze too late: the next checkpoint may be stored"
        victims[-1].kill()
        for victim in victims[:-1]:
            victim.resume()
        wait_until(lambda: job_status(ray_head, job) in ("SUCCEEDED", "FAILED", "STOPPED"), 400, "the job to end")
    finally:
        subprocess.run([RAY, "job", "stop", job], env=ray_head, capture_output=True, timeout=60)
    logs = subprocess.run([RAY, "job", "logs", job], env=ray_head, capture_output=True, text=True, timeout=60).stdout
    assert job_status(ray_head, job) == "SUCCEEDED", logs[-4000:]
    resumed = int(logs.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed >= 20 and resumed % 20 == 0, logs[-4000:]
    assert '{"step": 60, "checkpoint"' in logs
    steps = logged_steps(run)
    assert sorted(set(steps)) == list(range(1, 61))  # steps after the checkpoint ran twice, none lost
    assert steps[-1] == 60 and len(steps) > 60


def test_bad_input_is_one_clear_error(ray_head, tmp_path):
    too_many = subprocess.run([sys.executable, "launchers/ray_train.py", "configs/tiny.yaml",
                               "launch.workers_per_node=8", f"launch.ray_address={ray_head['GCS_ADDRESS']}"],
                              cwd=ROOT, env={**ray_head, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=120)
    assert too_many.returncode == 2, too_many.stderr[-2000:]
    assert "8 workers x 1 CPU = 8 CPUs, but the Ray cluster has 3" in too_many.stderr
    no_head = subprocess.run([sys.executable, "launchers/ray_train.py", "configs/tiny.yaml",
                              "launch.ray_address=127.0.0.1:1"], cwd=ROOT, env={**ray_head, "RAY_ADDRESS": ""},
                             capture_output=True, text=True, timeout=120)
    assert no_head.returncode == 2 and "no Ray cluster at launch.ray_address='127.0.0.1:1'" in no_head.stderr, \
        no_head.stderr[-2000:]
    missing = subprocess.run([sys.executable, "launchers/ray_train.py", "configs/nope.yaml"], cwd=ROOT,
                             env=ray_head, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "configs/nope.yaml does not exist" in missing.stderr


def test_ray_sample_job_writes_the_report(ray_head, tmp_path, pixel_shards, random_models):
    out = tmp_path / "eval"
    done = subprocess.run([RAY, "job", "submit", "--working-dir", ".", "--", "python", "launchers/ray_sample.py",
                           "configs/tiny.yaml", *eval_overrides(random_models, out, pixel_shards),
                           "launch.workers_per_node=2", "launch.max_failures=0"],
                          cwd=ROOT, env=ray_head, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "report.json").read_text())["results"][0]
    assert result["num_samples"] == 16 and 0 <= result["class_accuracy"] <= 1 and result["fid"] > 0
    assert len(list(out.glob("cfg3_steps5/samples-*.tar"))) == 4


def test_ray_evaluates_beside_training_from_checkpoint_events(ray_head, tmp_path, pixel_shards, random_models):
    """eval.during_training under Ray: an actor with its own CPU, fed by rank 0's checkpoint
    events, evaluates every checkpoint; the driver waits for it and prints what it did."""
    run = tmp_path / "run"
    out = submit(ray_head, ["train.max_steps=8", "train.ckpt_every=4", f"train.run_dir={run}", "train.keep_last=5",
                            f"data.shards={pixel_shards}", "launch.max_failures=0", "eval.during_training=true",
                            f"eval.classifier={random_models / 'classifier'}", f"eval.reference={pixel_shards}",
                            "sample.num_samples=8", "eval.samples_per_shard=4", "sample.batch_size=4",
                            "sample.steps=4", "eval.guidance_scales=[3]", "eval.cpus=1"])
    assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"step": 8, "checkpoint"')))
    assert summary["evaluated"] == {"evaluated": [4, 8], "skipped": {}}
    assert sorted(p.parent.name for p in (run / "eval").glob("step-*/report.json")) == ["step-000004", "step-000008"]
    assert json.loads((run / "eval/best.json").read_text())["step"] in (4, 8) and (run / "eval/curve.png").is_file()
    assert "eval/cfg3_steps4/fid" in (run / "metrics.jsonl").read_text()
