"""Shared fixtures. Everything here runs on CPU with tiny shapes."""

import os
import re
import subprocess
from pathlib import Path

import pytest

# Under pytest-xdist each worker gets its share of the cores, as each rank of a job does
# (runtime.distributed): with every worker's torch, and the ranks it starts (they inherit
# OMP_NUM_THREADS), on all cores at once, OpenMP threads spin against each other and a
# CPU-bound test ran up to 8x slower than alone.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import torch  # noqa: E402 (after the thread count it reads)

from dist_diffusion.core.schedule import make_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Modules whose tests start SLURM, Ray or the 2-node cluster, and modules whose tests
# start training or sampling processes; tests that use the S3 server are marked `s3`.
# `make test-fast` (-m "not slow and not cluster") is the inner loop.
CLUSTER_MODULES = {"test_cluster", "test_slurm", "test_ray"}
SLOW_MODULES = CLUSTER_MODULES | {"test_train", "test_evaluate", "test_demo", "test_ablation", "test_encode"}


# `make test` runs the suite in two pytest-xdist workers (`--dist loadfile`): a module is
# one unit of work, so its module fixtures (a SLURM cluster, a Ray head, trained models)
# start once. Units start longest first (measured on 2 cores), so the two workers end
# close together; unlisted modules take seconds and fill in at the end. Tests that look
# for processes by name (Ray Train workers, ranks) look only in their own cluster's
# network namespaces (`net_namespace`), since the other worker may run a cluster too.
LONGEST_FIRST = ["test_cluster", "test_train", "test_ablation", "test_slurm", "test_signals", "test_demo",
                 "test_evaluate", "test_eval_beside", "test_ray", "test_stream", "test_full_disk", "test_models"]


def unit_rank(item) -> int:
    module = item.module.__name__
    return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)


def net_namespace(pid: int | str = "self") -> str | None:
    """The network namespace a process lives in (None once it has exited)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__
        if module in CLUSTER_MODULES:
            item.add_marker(pytest.mark.cluster)
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)
    items.sort(key=unit_rank)  # stable: a module's tests keep their order, modules theirs


# A developer's `make test` without root skips the cluster tests, with the reason. In CI
# (.ci/run exports DD_REQUIRE_CLUSTER=1) such a skip fails instead: several of those tests
# are the only coverage of what they check, and a skip there would leave the suite green.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("cluster")
            and os.environ.get("DD_REQUIRE_CLUSTER") == "1"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"DD_REQUIRE_CLUSTER=1: a cluster test may not skip here ({reason})"


class TinyDenoiser(torch.nn.Module):
    """A small conditional network (x_t, t, label) -> prediction that behaves like a
    trained one: the exact prediction for unit-Gaussian data (eps* = sqrt(1 - a_t) x_t,
    v* = 0) plus a bounded learned term that depends on t and the label. Samples stay
    O(1), so trajectory differences measure sampler math, not blow-up."""

    def __init__(self, schedule: str = "linear", prediction: str = "epsilon", channels: int = 3,
                 num_classes: int = 4, hidden: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.alphas_cumprod = make_schedule(schedule).alphas_cumprod
        self.prediction = prediction
        self.inp = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.t_emb = torch.nn.Linear(4, hidden)
        self.y_emb = torch.nn.Embedding(num_classes + 1, hidden)
        self.out = torch.nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, t, labels):
        angle = t.float()[:, None] / 1000.0 * torch.tensor([3.0, 7.0])
        cond = self.t_emb(torch.cat([angle.sin(), angle.cos()], dim=1)) + self.y_emb(labels)
        h = torch.nn.functional.silu(self.inp(x) + cond[:, :, None, None])
        a = self.alphas_cumprod[t].to(x.dtype)[:, None, None, None]
        exact = (1 - a).sqrt() * x if self.prediction == "epsilon" else torch.zeros_like(x)
        return exact + 0.1 * torch.tanh(self.out(h))


def run_stopping_with_sigterm(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run, except that a demo stopped early (its timeout, pytest-timeout's)
    gets SIGTERM first, so it stops its own S3 server; SIGKILL would orphan it."""
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_dist_diffusion(argv: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """subprocess.run of `python -m dist_diffusion.cli ARGV` (from ROOT, output captured as
    text), in a process forked from a fork server that imported torch and diffusers once
    (dist_diffusion.cli.run_forked): each call saves about 5 s of CPU. A test of how the entry
    point itself starts (--help, installs, extras) runs the real interpreter instead."""
    import tempfile

    from dist_diffusion.cli import run_forked

    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        code = run_forked(argv, env=env, cwd=ROOT, stdout=out, stderr=err, timeout=timeout)
        return subprocess.CompletedProcess(argv, code, out.read_text(errors="replace"), err.read_text(errors="replace"))


def make_tiny_model(schedule: str = "linear", prediction: str = "epsilon"):
    model = TinyDenoiser(schedule, prediction).eval()
    return lambda x, t, y: model(x, t, y)


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 on loopback with access keys, for the whole session; stopped by
    PID whatever happens. Exports the AWS_* variables so boto3 (and our code) find it."""
    import os

    from dist_diffusion.data import storage
    from dist_diffusion.stack import start_s3, stop_s3

    server = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    storage.s3_client.cache_clear()
    try:
        yield server
    finally:
        stop_s3(server.pid)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage.s3_client.cache_clear()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket per test, named after it."""
    import re

    from dist_diffusion.data import storage

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    storage.s3_client().create_bucket(Bucket=name)
    return name


def make_class_folders(root, classes=4, per_class=50, corrupt=(), seed=0):
    """A class-folder tree of synthetic photos-like images of mixed sizes and formats;
    ``corrupt`` lists (class index, kind) of broken files to add."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            base = np.zeros((h, w, 3), np.uint8) + np.array([60 * c % 256, (30 + 40 * c) % 256, (200 - 40 * c) % 256], np.uint8)
            noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            ext = "png" if i % 5 == 0 else "JPEG" if i % 7 == 0 else "jpg"
            Image.fromarray(noisy).save(folder / f"img_{i:04d}.{ext}",
                                        format="PNG" if ext == "png" else "JPEG")
    for c, kind in corrupt:
        folder = root / f"n{c:08d}"
        if kind == "truncated":
            data = (folder / "img_0001.jpg").read_bytes()
            (folder / "bad_truncated.jpg").write_bytes(data[: len(data) // 3])
        elif kind == "garbage":
            (folder / "bad_garbage.png").write_bytes(b"not an image at all" * 10)
        else:
            (folder / "bad_empty.jpg").write_bytes(b"")
    return root


def make_pairs(folder, count=12, classes=3, size=16, start=0, seed=0):
    """A flat folder of ``<key>.jpg`` + ``<key>.cls`` pairs, the layout users ``tar`` up;
    the image of class c is tinted by c, so labels can be checked against pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        label = i % classes
        pixels = np.clip(rng.normal(40 + 80 * label, 10, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=95)
        (folder / f"{i:06d}.cls").write_text(str(label))
    return folder


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `dist-diffusion ARGV`, run in this process."""
    from dist_diffusion.cli import main

    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, want_code: int, says: str) -> None:
    """A refusal: exit ``want_code``, no traceback, one `error:` line containing ``says``
    (progress-bar lines aside)."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("prepare:", "index:", "\r"))]
    assert code == want_code and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err


# Pixel-space 16 px overrides for configs/tiny.yaml: the quickest real training job.
PIXEL16 = ["vae.enabled=false", "data.resolution=16", "model.num_classes=4", "train.batch_size=16",
           "train.warmup_steps=2", "train.log_every=1", "data.num_workers=0", "data.hflip=false"]


@pytest.fixture(scope="session")
def pixel_shards(s3_server, tmp_path_factory):
    """160 images of 4 classes as 16 px shards in S3, for the launcher tests."""
    from dist_diffusion.config import DataConfig
    from dist_diffusion.data import storage
    from dist_diffusion.data.prepare import prepare

    storage.s3_client().create_bucket(Bucket="launch-data")
    src = make_class_folders(tmp_path_factory.mktemp("launch-src"), classes=4, per_class=40)
    prepare(src, "s3://launch-data/img16", DataConfig(resolution=16, samples_per_shard=40), progress=False)
    return "s3://launch-data/img16"


def wait_until(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


SLURM_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def slurm_job(env: dict, job: str) -> dict:
    """`scontrol show job` as a dict: {} once SLURM has forgotten the job, JobState "?"
    while slurmctld does not answer (a busy controller times out; that is not the end)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return {} if "invalid job id" in out.stderr.lower() else {"JobState": "?"}
    return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)


def lift_requeue_backoff(env: dict, job: str, check: bool = True) -> None:
    """Let a requeued job start in 2 s instead of after SLURM's back-off (cred_expire), a
    real cluster's guard the tests cannot wait out. First, slurmctld must owe no RPC: a
    signal for the job's old step to a node that stopped answering waits in its retry
    queue (retried a minute later) and would land on the restarted step, which reuses
    the id. Not to "now": slurmd revokes the old credential with a 1-second clock, and a
    restart within that second is killed ("Job credential revoked")."""
    wait_until(lambda: _slurmctld_owes_no_rpc(env), 300, "slurmctld to deliver or drop the RPCs it retries",
               interval=1)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], env=env, check=check,
                   capture_output=True, timeout=30)


def _slurmctld_owes_no_rpc(env: dict) -> bool:
    """sdiag, twice a second apart: no RPC in slurmctld's retry queue (Agent queue size) or
    on its way (Agent count). Twice, since a retry leaves the queue a moment before it counts."""
    import time

    def idle() -> bool:
        out = subprocess.run(["sdiag"], env=env, capture_output=True, text=True, timeout=30)
        counts = dict(re.findall(r"^\s*(Agent queue size|Agent count):\s*(\d+)", out.stdout, re.M))
        return out.returncode == 0 and len(counts) == 2 and not any(int(n) for n in counts.values())

    return idle() and (time.sleep(1) or idle())


def sbatch_and_wait(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """What ``sbatch --wait ARGS`` does, polling twice a second: sbatch --wait sleeps 2, 8,
    then 32 s between its polls, so a job of 20 s held the test for 42. The returncode is
    the job's exit code (128 + the signal that ended it; 1 if SLURM ended it otherwise)."""
    submitted = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=60)
    if submitted.returncode != 0:
        return submitted
    job = submitted.stdout.strip().split(";")[0]
    try:
        fields = wait_until(lambda: (f := slurm_job(env, job)).get("JobState") in SLURM_ENDED and f, timeout,
                            f"SLURM job {job} to end")
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)  # a no-op once it ended
    code, signal = (int(part) for part in fields.get("ExitCode", "1:0").split(":"))
    code = 128 + signal if signal else code or int(fields["JobState"] != "COMPLETED")
    return subprocess.CompletedProcess(submitted.args, code, submitted.stdout, f"job {job}: {fields['JobState']}")


def logged_steps(run_dir) -> list[int]:
    import json
    from pathlib import Path

    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    """An untrained 16 px pixel-space UNet and domain classifier (4 classes), exported."""
    import torch

    from dist_diffusion.config import load_config
    from dist_diffusion.config import unet_input_shape
    from dist_diffusion.core.models import build_classifier, build_unet

    tmp = tmp_path_factory.mktemp("models")
    cfg = load_config("configs/tiny.yaml", PIXEL16)
    torch.manual_seed(0)
    build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).save_pretrained(tmp / "unet")
    build_classifier(cfg.model, cfg.data).save_pretrained(tmp / "classifier")
    return tmp


def eval_overrides(models, out, reference) -> list[str]:
    return ["vae.enabled=false", "data.resolution=16", "model.num_classes=4", f"eval.unet={models / 'unet'}",
            f"eval.classifier={models / 'classifier'}", f"eval.reference={reference}", f"eval.out={out}",
            "sample.num_samples=16", "eval.samples_per_shard=4", "sample.batch_size=4", "sample.steps=5"]


def diffusers_cfg_loop(unet, scheduler, noise, labels, null: int, scale: float, steps: int):
    """Class-conditional sampling + CFG with a diffusers scheduler, as a diffusers user writes
    it: set_timesteps, one batched cond+uncond call, step (pipelines' __call__ passes no labels)."""
    import torch

    with torch.no_grad():
        scheduler.set_timesteps(steps)
        x, both = noise.clone(), torch.cat([labels, torch.full_like(labels, null)])
        for t in scheduler.timesteps:
            cond, uncond = unet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
            x = scheduler.step(uncond + scale * (cond - uncond), t, x).prev_sample
    return x
