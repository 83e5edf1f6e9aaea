"""Evaluation beside training (eval.during_training, `dist-diffusion watch`) and the
trackers (log.trackers): which steps are due, a 2-rank local run evaluated as it trains, a
watcher killed mid-evaluation, 1 against 2 evaluation processes, and what TensorBoard, W&B
(offline) and MLflow (a local file store) received, read back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PIXEL16, ROOT, make_class_folders, run_dist_diffusion, wait_until
from dist_diffusion.config import load_config
from dist_diffusion.evaluate.beside import Progress, due_steps
from dist_diffusion.evaluate.curve import write_best


def _due(**keys) -> list[int]:
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"{k.replace('__', '.')}={v}" for k, v in keys.items()])
    return due_steps(cfg.train, cfg.eval)


def test_due_steps_follow_the_checkpoint_schedule_and_always_end_with_the_last():
    assert _due(train__max_steps=100, train__ckpt_every=20) == [20, 40, 60, 80, 100]
    assert _due(train__max_steps=100, train__ckpt_every=20, eval__every_checkpoints=2) == [40, 80, 100]
    assert _due(train__max_steps=95, train__ckpt_every=20, eval__every_checkpoints=3) == [60, 95]
    # every_steps is rounded up to the next checkpoint: 30 -> 40, 60, 90 -> 100
    assert _due(train__max_steps=100, train__ckpt_every=20, eval__every_steps=30) == [40, 60, 100]
    assert _due(train__max_steps=10, train__ckpt_every=500) == [10]


def test_the_newest_waiting_step_goes_first_and_pruned_ones_are_lost():
    progress = Progress(due=[10, 20, 30, 40], complete={30, 40}, done={10})
    assert progress.waiting() == [40, 30]
    assert progress.lost() == [20]  # written (30 is complete) and pruned before its turn
    assert not progress.finished()
    assert Progress(due=[10, 20], complete={10, 20}, done={20}).finished() is False  # 10 still on disk
    assert Progress(due=[10, 20], complete={20}, done={20}).finished()


def test_best_step_by_lower_or_higher_is_better(tmp_path):
    reports = {step: {"results": [{"fid": fid, "class_accuracy": acc, "samples": f"x/step-{step}/cfg3_steps5"}]}
               for step, fid, acc in ((10, 5.0, 0.5), (20, 3.0, 0.9), (30, 3.0, 0.7))}
    best = write_best(reports, "fid", tmp_path / "best.json")
    assert (best["step"], best["value"], best["point"]) == (20, 3.0, "cfg3_steps5")  # a tie: the earlier step
    assert write_best(reports, "class_accuracy", tmp_path / "best.json")["step"] == 20
    assert json.loads((tmp_path / "best.json").read_text())["metric"] == "class_accuracy"


# ---- a real run: 2 training ranks, the watcher beside them ------------------------------------

# 8 shards of 2 samples a point, 50 steps each: a step's evaluation lasts long enough to be killed midway
EVAL = ["sample.num_samples=16", "eval.samples_per_shard=2", "sample.batch_size=2", "sample.steps=50",
        "eval.guidance_scales=[1,3]"]


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """16 px image shards of 4 classes and a (random) domain classifier that judges them."""
    import torch

    from dist_diffusion.config import DataConfig
    from dist_diffusion.core.models import build_classifier
    from dist_diffusion.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("beside")
    src = make_class_folders(tmp / "src", classes=4, per_class=24)
    prepare(src, str(tmp / "img16"), DataConfig(resolution=16, samples_per_shard=32), progress=False)
    cfg = load_config(ROOT / "configs/tiny.yaml", PIXEL16)
    torch.manual_seed(0)
    build_classifier(cfg.model, cfg.data).save_pretrained(tmp / "classifier")
    return tmp


def train_args(judged: Path, run_dir: Path, max_steps: int) -> list[str]:
    return ["train", "--config", "configs/tiny.yaml", "--nproc", "2", *PIXEL16, "train.log_every=5",
            f"data.shards={judged / 'img16'}", f"train.max_steps={max_steps}", "train.ckpt_every=10",
            "train.keep_last=5", f"train.run_dir={run_dir}", "eval.during_training=true",
            f"eval.classifier={judged / 'classifier'}", f"eval.reference={judged / 'img16'}", *EVAL,
            "log.trackers=[tensorboard,wandb,mlflow]", "log.wandb_mode=offline"]


@pytest.fixture(scope="module")
def trained(judged):
    """30 steps, checkpoints at 10, 20, 30, each evaluated beside training."""
    run_dir = judged / "run"
    done = run_dist_diffusion(train_args(judged, run_dir, 30), timeout=900, env={**os.environ, "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, done.stdout + done.stderr


def reports(run_dir: Path) -> dict[int, dict]:
    return {int(p.parent.name.split("-")[1]): json.loads(p.read_text())
            for p in sorted((run_dir / "eval").glob("step-*/report.json"))}


@pytest.mark.slow
def test_every_checkpoint_is_evaluated_beside_training_with_curve_and_best(trained, tmp_path):
    run_dir, log = trained
    found = reports(run_dir)
    assert sorted(found) == [10, 20, 30], log[-3000:]
    for step, report in found.items():
        assert [row["guidance_scale"] for row in report["results"]] == [1.0, 3.0]
        assert report["results"][0]["checkpoint"].endswith(f"step{step:08d}")
        assert report["results"][0]["fid"] > 0 and 0 <= report["results"][0]["class_accuracy"] <= 1
    assert (run_dir / "eval/curve.png").stat().st_size > 10_000
    best = json.loads((run_dir / "eval/best.json").read_text())
    fids = {step: report["results"][0]["fid"] for step, report in found.items()}
    assert best["step"] == min(fids, key=fids.get) and best["metric"] == "fid"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    eval_rows = {row["step"]: row for row in rows if "eval/cfg1_steps50/fid" in row}
    assert sorted(eval_rows) == [10, 20, 30] and eval_rows[30]["eval/cfg1_steps50/fid"] == fids[30]
    assert [row["step"] for row in rows if "loss" in row] == [5, 10, 15, 20, 25, 30]  # no line broken
    out = tmp_path / "best"
    done = run_dist_diffusion(["export", "--run-dir", str(run_dir), "--best", "--out", str(out)])
    assert done.returncode == 0 and f"step {best['step']}" in done.stdout, done.stderr[-2000:]
    assert json.loads((out / "dist_diffusion.json").read_text())["checkpoint"].endswith(f"step{best['step']:08d}")


@pytest.mark.slow
def test_tensorboard_gets_the_curves_and_the_images(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = trained
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "eval/cfg3_steps50/fid", "eval/cfg1_steps50/class_accuracy"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("eval/cfg3_steps50/fid")] == [10, 20, 30] or \
        sorted(e.step for e in events.Scalars("eval/cfg3_steps50/fid")) == [10, 20, 30]
    assert {"eval/curve", "eval/samples"} <= set(tags["images"])


def wandb_records(path: Path):
    """The records of a W&B offline run file: LevelDB's log format (32 KiB blocks; a 7-byte
    header per chunk: CRC, length, kind FULL/FIRST/MIDDLE/LAST) after W&B's 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_logged(run_dir: Path) -> tuple[set[str], list[dict], set[str]]:
    """(the run ids, every history row, the config keys) of the run's offline W&B files."""
    ids, rows, config = set(), [], set()
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config |= {item.key for item in record.run.config.update}
            elif kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return ids, rows, config


@pytest.mark.slow
def test_wandb_offline_and_mlflow_read_back(trained):
    import mlflow

    run_dir, _ = trained
    stored = json.loads((run_dir / "trackers.json").read_text())
    ids, rows, config = wandb_logged(run_dir)
    assert ids == {stored["wandb"]}  # the trainer and the watcher log into one run
    assert {"train", "eval", "model", "diffusion"} <= config
    fid_steps = sorted(r["train_step"] for r in rows if "eval/cfg3_steps50/fid" in r)
    assert fid_steps == [10, 20, 30]
    assert [r["train_step"] for r in rows if "train/loss" in r] == [5, 10, 15, 20, 25, 30]
    assert any(r.get("eval/curve", {}).get("_type") == "image-file" or "eval/curve/_type" in r for r in rows)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run = client.get_run(stored["mlflow"])
    assert run.data.params["train.max_steps"] == "30" and run.data.params["eval.during_training"] == "true"
    fids = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/cfg1_steps50/fid")}
    assert fids == {step: r["results"][0]["fid"] for step, r in reports(run_dir).items()}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20, 25, 30]


def copy_without_eval(run_dir: Path, dest: Path, drop_steps: tuple[int, ...] = ()) -> Path:
    """The trained run, not yet evaluated; the checkpoints of ``drop_steps`` pruned (the
    watcher records them as lost: less to evaluate)."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("eval", "wandb", "mlruns", "tensorboard",
                                                                 "trackers.json", ".lock"))
    for step in drop_steps:
        shutil.rmtree(dest / "checkpoints" / f"step{step:08d}")
    return dest


def watch(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dist_diffusion.cli", "watch", "--run-dir", str(run_dir),
                             "--poll-seconds", "0.5", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_watcher_killed_mid_evaluation_resumes_without_redoing_finished_steps(trained, tmp_path):
    run_dir = copy_without_eval(trained[0], tmp_path / "run", drop_steps=(10,))
    (run_dir / "eval").mkdir()
    (run_dir / "eval/TRAINING_ENDED").write_text("")  # nothing more will come: end when done
    first = watch(run_dir)
    try:  # the newest first: 30 is finished, then 20 is half sampled
        wait_until(lambda: (run_dir / "eval/step-000030/report.json").exists()
                   and any((run_dir / "eval/step-000020").glob("cfg1_steps50/samples-*.npz")), 300,
                   "step 30 evaluated and step 20 under way", interval=0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (run_dir / "eval/step-000020/report.json").exists(), "step 20 ended before it could be killed midway"
    finished = (run_dir / "eval/step-000030/report.json").stat().st_mtime_ns
    second = watch(run_dir)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    assert (run_dir / "eval/step-000030/report.json").stat().st_mtime_ns == finished  # not evaluated again
    found = reports(run_dir)
    assert sorted(found) == [20, 30]
    assert "pruned" in json.loads((run_dir / "eval/skipped.json").read_text())["10"]
    assert found[20]["results"][0]["resumed_shards"] >= 1  # the shards written before the kill were kept
    original = reports(trained[0])
    for step in (20, 30):
        assert _figures(found[step]) == _figures(original[step])


def _figures(report: dict) -> list[dict]:
    keys = ("fid", "fid_inf", "kid", "inception_score", "class_accuracy", "precision", "recall")
    return [{k: row[k] for k in keys} for row in report["results"]]


@pytest.mark.slow
def test_figures_are_identical_for_1_and_2_evaluation_processes(trained, tmp_path):
    run_dir = copy_without_eval(trained[0], tmp_path / "run", drop_steps=(10, 20))
    (run_dir / "eval").mkdir()
    (run_dir / "eval/TRAINING_ENDED").write_text("")
    proc = watch(run_dir, "--nproc", "2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    two, one = reports(run_dir), reports(trained[0])
    assert sorted(two) == [30]
    for step in two:
        assert _figures(two[step]) == _figures(one[step])  # ==, not approx


@pytest.mark.slow
def test_a_second_watcher_on_the_same_run_leaves_at_once(trained, tmp_path):
    run_dir = copy_without_eval(trained[0], tmp_path / "run")
    first = watch(run_dir)  # no TRAINING_ENDED: it waits for more
    try:
        wait_until(lambda: (run_dir / "eval/.watcher.lock").exists(), 120, "the first watcher's lock")
        second = subprocess.run([sys.executable, "-m", "dist_diffusion.cli", "watch", "--run-dir", str(run_dir)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "another watcher follows" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=120)


@pytest.mark.slow
def test_resumed_run_continues_the_same_tracker_runs_and_evaluates_the_new_steps(judged, trained):
    run_dir = trained[0]
    before = json.loads((run_dir / "trackers.json").read_text())
    done = run_dist_diffusion(train_args(judged, run_dir, 40), timeout=900, env={**os.environ, "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((run_dir / "trackers.json").read_text()) == before
    assert sorted(reports(run_dir)) == [10, 20, 30, 40]
    ids, rows, _ = wandb_logged(run_dir)
    assert ids == {before["wandb"]} and 40 in {r["train_step"] for r in rows if "eval/cfg1_steps50/fid" in r}
