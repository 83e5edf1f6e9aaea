"""Two nodes for real: infra/local/cluster.sh makes node1 and node2 (each its own network
and UTS namespace, on a private bridge), with SLURM, Ray and S3 across them. Training
places one rank on each node, over the bridge, and equals the same run on one node; a
run that loses node2 mid-run resumes and ends bitwise equal to the uninterrupted run."""

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import (PIXEL16, eval_overrides, logged_steps, make_class_folders, net_namespace, run_dist_diffusion,
                      SLURM_ENDED, lift_requeue_backoff, sbatch_and_wait, slurm_job, wait_until)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "infra/local/cluster.sh")
RAY = str(Path(sys.executable).parent / "ray")
LAST, CKPT_EVERY = 12, 6
TRAIN = [*PIXEL16, f"train.max_steps={LAST}", f"train.ckpt_every={CKPT_EVERY}", "runtime.rendezvous_timeout_s=300"]


def random_subnet() -> str:
    return f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(250)}"


def cluster_env(state: Path, prefix: str, subnet: str) -> dict:
    return {**os.environ, "CLUSTER_DIR": str(state), "CLUSTER_PREFIX": prefix, "CLUSTER_SUBNET": subnet,
            "DD_PYTHON": sys.executable}


def leftovers(prefix: str, pids: list[int]) -> list[str]:
    """Namespaces, links and processes of the cluster that still exist."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found = [line for line in netns.splitlines() if line.startswith(f"{prefix}node")]
    found += [line.split(":")[1].strip() for line in links.splitlines() if f" {prefix}" in line]
    found += [f"pid {p}" for p in pids if Path(f"/proc/{p}").exists()]
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The 2-node cluster, up for this module; down whatever happens, then checked empty.
    Where it cannot be made (exit 3: no root or namespaces, no free subnet) its tests skip
    with the reason; under DD_REQUIRE_CLUSTER=1 (.ci/run) that skip fails (conftest.py)."""
    state = tmp_path_factory.mktemp("cluster")
    prefix = "t" + secrets.token_hex(2)
    env = cluster_env(state, prefix, random_subnet())
    try:  # `up` itself inside: an interrupted `up` leaves namespaces that `down` removes
        up = subprocess.run([SCRIPT, "up"], env=env, capture_output=True, text=True, timeout=600)
        if up.returncode == 3:
            pytest.skip(f"no 2-node cluster on this machine: {up.stderr.strip()}")
        assert up.returncode == 0, up.stdout + up.stderr
        yield _client_env(state, env), (state / "subnet").read_text().strip()  # the one `up` took
    finally:
        pids = _recorded_pids(state)
        down = subprocess.run([SCRIPT, "down"], env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr
        assert leftovers(prefix, pids) == []


def _client_env(state: Path, env: dict) -> dict:
    """The variables of the cluster's env.sh (SLURM_CONF, RAY_ADDRESS, AWS_*)."""
    out = subprocess.run(["bash", "-c", f"source {state}/env.sh && env -0"], capture_output=True, timeout=30)
    return {**env, **dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)}


def _recorded_pids(state: Path) -> list[int]:
    files = list(state.glob("ray-node*.pid")) + list(state.glob("slurm/pids/*.pid"))
    return [int(p.read_text()) for p in files if p.read_text().strip().isdigit()]


@pytest.fixture(scope="module")
def shards(cluster, tmp_path_factory):
    """160 images as 16 px shards in the cluster's S3 (on the bridge, reachable from every node)."""
    env, _ = cluster
    src = make_class_folders(tmp_path_factory.mktemp("cluster-src"), classes=4, per_class=40)
    subprocess.run([sys.executable, "-c", "import boto3; boto3.client('s3').create_bucket(Bucket='nodes')"],
                   env=env, check=True, timeout=60)
    done = run_dist_diffusion(["prepare", "--src", str(src), "--out", "s3://nodes/img16", "data.resolution=16",
                               "data.samples_per_shard=40"], timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return "s3://nodes/img16"


def placements(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "hosts").glob("rank*.json"))]


def assert_one_rank_per_node(run: Path, subnet: str) -> None:
    ranks = placements(run)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["hostname"] for r in ranks} == {"node1", "node2"}
    assert sorted(r["address"] for r in ranks) == [f"{subnet}.11", f"{subnet}.12"]  # the bridge, not loopback
    assert all(r["socket_ifname"] == "eth0" and r["backend"] == "gloo" for r in ranks), ranks


def seen_and_losses(run: Path) -> tuple[dict, dict]:
    """(rank file, step) -> the keys that rank trained on, and step -> loss; after a
    resume, the record of the run that went on wins."""
    seen, losses = {}, {}
    for path in sorted(run.glob("samples_rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            seen[(path.name, row["step"])] = row["keys_sha1"]
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        losses[row["step"]] = row["loss"]
    return seen, losses


def assert_matches_one_node(run: Path, one_node: Path) -> None:
    """The same run on one host and on two is bitwise the same: every rank sees the same
    samples at every step, and the final checkpoint (EMA, weights, optimizer state) is
    equal. gloo sums two ranks' gradients the same way over loopback and over the bridge;
    what differed once was the CPU thread count per rank (SLURM's --cpus-per-task is now
    the share), which changes how a matmul rounds."""
    assert_same_checkpoint(run, one_node)
    assert seen_and_losses(run) == seen_and_losses(one_node)


@pytest.fixture(scope="module")
def one_node_run(cluster, shards, tmp_path_factory):
    """The same training, 2 processes on this machine (loopback), for comparison."""
    env, _ = cluster
    run = tmp_path_factory.mktemp("one-node") / "run"
    done = run_dist_diffusion(["train", "--config", "configs/tiny.yaml", "--nproc", "2", *TRAIN,
                               f"train.run_dir={run}", f"data.shards={shards}"], timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def sbatch_on_two_nodes(env: dict, log: Path, script: str, *overrides: str) -> str:
    """``sbatch --wait`` of SCRIPT on the tiny recipe with one task on each node; its log."""
    done = sbatch_and_wait(["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                            f"--output={log}", script, "configs/tiny.yaml", *overrides], env, timeout=600)
    text = log.read_text(errors="replace") if log.exists() else ""
    assert done.returncode == 0, done.stderr + text[-3000:]
    return text


@pytest.fixture(scope="module")
def sbatch_two_node_run(cluster, shards, tmp_path_factory):
    """The tiny recipe by sbatch, one rank on each node, uninterrupted: (run dir, job log)."""
    env, _ = cluster
    run = tmp_path_factory.mktemp("sbatch-two-nodes") / "run"
    text = sbatch_on_two_nodes(env, run.with_name("job.out"), "slurm/train_latent.sh", *TRAIN,
                               f"train.run_dir={run}", f"data.shards={shards}")
    return run, text


def ray_train_on_two_nodes(env: dict, run: Path, shards: str, *extra: str) -> list[str]:
    """`ray job submit` of launchers/ray_train.py, one worker on each node."""
    return [RAY, "job", "submit", "--address", env["RAY_ADDRESS"], *extra, "--working-dir", ".", "--", "python",
            "launchers/ray_train.py", "configs/tiny.yaml", *TRAIN, f"train.run_dir={run}", f"data.shards={shards}",
            "launch.nodes=2", "launch.workers_per_node=1"]


@pytest.fixture(scope="module")
def ray_two_node_run(cluster, shards, tmp_path_factory):
    """The tiny recipe by Ray Train, one worker on each node, uninterrupted: (run dir, job log)."""
    env, _ = cluster
    run = tmp_path_factory.mktemp("ray-two-nodes") / "run"
    done = subprocess.run([*ray_train_on_two_nodes(env, run, shards), "launch.max_failures=0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return run, done.stdout


def test_sbatch_two_nodes_one_rank_each_equals_one_node(cluster, sbatch_two_node_run, one_node_run):
    _, subnet = cluster
    run, text = sbatch_two_node_run
    assert "2 tasks on node[1-2]" in text
    assert_one_rank_per_node(run, subnet)
    assert_matches_one_node(run, one_node_run)


def test_ray_two_nodes_one_worker_each(cluster, ray_two_node_run, one_node_run):
    _, subnet = cluster
    run, text = ray_two_node_run
    assert f'"step": {LAST}' in text
    assert_one_rank_per_node(run, subnet)
    assert_matches_one_node(run, one_node_run)


def train_one_process(env: dict, *overrides: str) -> str:
    """The tiny recipe in one process on this machine; its stdout."""
    done = run_dist_diffusion(["train", "--config", "configs/tiny.yaml", "--nproc", "1", *overrides], timeout=600,
                              env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def keys_by_step(run: Path) -> dict[int, list[str]]:
    """step -> the keys every rank trained on at that step (after a resume, the last record wins)."""
    latest = {}
    for path in sorted(run.glob("samples_rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            latest[(path.name, row["step"])] = row["keys"]
    by_step: dict[int, list[str]] = {}
    for (_, step), keys in sorted(latest.items()):
        by_step.setdefault(step, []).extend(keys)
    return by_step


# ZeRO-3 only: its partitioned parameters and EMA are the hard case across nodes; ZeRO-2's
# N -> M resume (2 -> 1 and 1 -> 2) is tested on one host in test_train.py, and the cross-node
# parts (universal conversion by rank 0 first, the data position) do not depend on the stage.
@pytest.mark.parametrize("stage", [3])
def test_elastic_one_process_to_two_nodes_and_back(cluster, shards, tmp_path, stage):
    """One epoch (160 samples, global batch 16: 10 steps) trained in three legs: 1 process
    on this machine (steps 1-3), one rank on each node by sbatch (4-6), 1 process again
    (7-10). Each leg resumes the other's ZeRO checkpoint, and each sample of the epoch is
    trained on exactly once."""
    env, _ = cluster
    run = tmp_path / "run"
    args = [*PIXEL16, f"runtime.zero_stage={stage}", "train.ckpt_every=3", "runtime.rendezvous_timeout_s=300",
            f"train.run_dir={run}", f"data.shards={shards}"]
    train_one_process(env, *args, "train.max_steps=3")
    text = sbatch_on_two_nodes(env, tmp_path / "job.out", "slurm/train_latent.sh", *args, "train.max_steps=6")
    assert "2 tasks on node[1-2]" in text and "(written by 1 processes, now 2)" in text, text[-3000:]
    assert "(written by 2 processes, now 1)" in train_one_process(env, *args, "train.max_steps=10")
    steps = keys_by_step(run)
    assert sorted(steps) == list(range(1, 11)) and all(len(keys) == 16 for keys in steps.values())
    epoch = [key for step in range(1, 11) for key in steps[step]]
    assert len(epoch) == len(set(epoch)) == 160


@pytest.fixture(scope="module")
def one_process_eval(cluster, shards, random_models, tmp_path_factory):
    """The sampling job in one process on this machine, for comparison."""
    env, _ = cluster
    out = tmp_path_factory.mktemp("eval-one-process") / "eval"
    done = run_dist_diffusion(["eval", "--config", "configs/tiny.yaml", *eval_overrides(random_models, out, shards)],
                              timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def sample_shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("cfg3_steps5/samples-*.tar"))}


def assert_same_evaluation(out: Path, reference: Path) -> None:
    """Byte-identical sample shards (each sample's noise comes from its own seed, whatever
    process or node draws it, and each process computes on one thread) and the same
    report: FID and IS are summed from the shards' features in shard order, so they are
    equal with ==, like the class accuracy."""
    assert sample_shards(out) == sample_shards(reference) and len(sample_shards(out)) == 4
    got, want = (json.loads((d / "report.json").read_text())["results"][0] for d in (out, reference))
    assert got["num_samples"] == want["num_samples"] == 16
    for key in ("class_accuracy", "fid", "inception_score"):
        assert got[key] == want[key], key


def test_sbatch_sampling_on_two_nodes_equals_one_process(cluster, shards, random_models, one_process_eval, tmp_path):
    env, _ = cluster
    out, log = tmp_path / "eval", tmp_path / "job.out"
    text = sbatch_on_two_nodes(env, log, "slurm/sample_fid.sh", *eval_overrides(random_models, out, shards))
    assert "2 sampling tasks on node[1-2]" in text
    assert_same_evaluation(out, one_process_eval)


def test_ray_sampling_on_two_nodes_equals_one_process(cluster, shards, random_models, one_process_eval, tmp_path):
    env, _ = cluster
    out = tmp_path / "eval"
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
                           env["RAY_ADDRESS"], "--working-dir", ".", "--", "python", "launchers/ray_sample.py",
                           "configs/tiny.yaml", *eval_overrides(random_models, out, shards), "launch.nodes=2",
                           "launch.workers_per_node=1", "launch.max_failures=0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert_same_evaluation(out, one_process_eval)


def test_up_on_a_subnet_in_use_takes_another(tmp_path):
    """`up` asked for a subnet that is already routed here (a bridge of this test's holds
    it, as another cluster's would) takes a random free one instead of giving up. Its python
    is a stand-in that records where it was asked to start S3 (and the bridge's address
    then) and fails, so `up` stops there and removes what it made."""
    prefix, taken = "t" + secrets.token_hex(2), random_subnet()
    holder = subprocess.run(f"ip link add {prefix}hold type bridge && ip addr add {taken}.1/24 dev {prefix}hold && "
                            f"ip link set {prefix}hold up", shell=True, capture_output=True, text=True)
    try:
        if holder.returncode != 0:
            pytest.skip(f"cannot make a bridge here (needs root): {holder.stderr.strip()}")
        calls, stand_in = tmp_path / "calls", tmp_path / "python"
        stand_in.write_text(f'#!/bin/sh\necho "$*" >>{calls}\nip -o -4 addr show dev {prefix}br0 >>{calls}\nexit 1\n')
        stand_in.chmod(0o755)
        env = {**cluster_env(tmp_path / "state", prefix, taken), "DD_PYTHON": str(stand_in)}
        up = subprocess.run([SCRIPT, "up"], env=env, capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["ip", "link", "del", f"{prefix}hold"], capture_output=True)
    tried = re.findall(r"is already routed on this machine; trying (10\.\d+\.\d+)\.0/24", up.stderr)
    assert f"subnet {taken}.0/24 is already routed" in up.stderr and tried and tried[-1] != taken, up.stderr
    assert up.returncode not in (0, 3) and "cluster failed to start" in up.stderr, up.stderr  # past the subnet
    recorded = calls.read_text()
    assert f"stack up --root {tmp_path / 'state'}/s3 --host {tried[-1]}.1" in recorded, recorded
    assert f"inet {tried[-1]}.1/24" in recorded, recorded  # the bridge was made on the new subnet
    assert leftovers(prefix, []) == [] and not (tmp_path / "state/subnet").exists()


def test_a_rank_whose_peer_never_comes_stops_with_one_line(tmp_path):
    """Rank 1 of 2 never starts (as if its node died before the rendezvous): rank 0 gives
    up after runtime.rendezvous_timeout_s with one line, instead of holding the job."""
    from dist_diffusion.runtime.env import free_ports

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_ports(1)[0])}
    shards = tmp_path / "shards"  # a manifest the rank checks before it joins; no shard is read
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"kind": "images", "resolution": 32, "num_classes": 1,
                                                      "classes": ["a"], "num_samples": 0, "shards": []}))
    out = subprocess.run([sys.executable, "-m", "dist_diffusion.train", "configs/tiny.yaml",
                          "runtime.rendezvous_timeout_s=5", f"train.run_dir={tmp_path / 'run'}", "vae.enabled=false",
                          f"data.shards={shards}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: rank 0 of 2 could not form the process group at 127.0.0.1:")
    assert "within 5s" in line and "runtime.rendezvous_timeout_s" in line


def test_the_process_group_binds_the_interface_that_routes_to_the_master(monkeypatch):
    from dist_diffusion.runtime import distributed

    assert distributed.route_interface("127.0.0.1") is None  # one host: leave gloo alone
    # a private environment: what bind_interface sets must not reach later tests' subprocesses
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    monkeypatch.setattr(os, "environ", {**env, "MASTER_ADDR": "10.1.2.3"})
    monkeypatch.setattr(distributed, "route_interface", lambda address: f"if-to-{address}")
    distributed.bind_interface()
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "if-to-10.1.2.3"
    os.environ["GLOO_SOCKET_IFNAME"] = "ib0"  # the user's choice wins
    distributed.bind_interface("eth9")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ib0"


# ---- node loss: every process of node2 killed at once, mid-run, after a checkpoint ----

def checkpoint_tensors(run: Path, step: int = LAST) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: the EMA, the bf16 weights and the optimizer state
    (fp32 master weights, Adam moments), keyed by file and path."""
    found: dict[str, torch.Tensor] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")

    for path in sorted((run / f"checkpoints/step{step:08d}").iterdir()):
        if path.suffix == ".safetensors":
            walk(load_file(str(path)), path.name)
        elif path.suffix == ".pt":
            walk(torch.load(path, map_location="cpu", weights_only=False), path.name)
    return found


def assert_same_checkpoint(run: Path, other: Path) -> None:
    got, want = checkpoint_tensors(run), checkpoint_tensors(other)
    assert got.keys() == want.keys() and any("ema_rank" in k for k in got) and any("optim" in k for k in got)
    assert [k for k in got if not torch.equal(got[k], want[k])] == []


def assert_bitwise_the_uninterrupted_run(run: Path, uninterrupted: Path) -> None:
    """The final weights, EMA and optimizer state are bitwise the uninterrupted run's, and
    every rank trained on the same samples at every step, the replayed ones included."""
    assert_same_checkpoint(run, uninterrupted)
    assert seen_and_losses(run) == seen_and_losses(uninterrupted)
    replayed = [json.loads(line)["step"] for line in (run / "samples_rank000.jsonl").read_text().splitlines()]
    assert sorted(set(replayed)) == list(range(1, LAST + 1))
    assert len(replayed) > LAST, "no step ran twice: node2 was not lost after the checkpoint"


def processes(*needles: str) -> list[psutil.Process]:
    """Python processes on the cluster's nodes (in a network namespace other than this
    process's, not a loopback Ray of another test) whose command line holds every needle
    (not srun or bash around them)."""
    here = net_namespace()
    return [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].split("/")[-1]
            .startswith(("python", "ray::")) and all(n in " ".join(p.info["cmdline"]) for n in needles)
            and net_namespace(p.pid) not in (here, None)]


def freeze_both_after_their_first_checkpoint(runs: list[tuple[Path, Path, object]]) -> list[psutil.Process]:
    """From step markers, not from time: as soon as a run (run dir, its stored first
    checkpoint, its ranks) has logged a step after that checkpoint, freeze its ranks and
    check it is short of the next checkpoint; returns every frozen rank."""
    frozen, waiting = [], list(runs)

    def one_ready():
        return next((r for r in waiting if (r[1] / "COMPLETE").exists()
                     and max(logged_steps(r[0]), default=0) > CKPT_EVERY and r[2]()), None)

    while waiting:
        run, _, ranks = wait_until(one_ready, 400, "a step after the first checkpoint", interval=0.02)
        for rank in ranks():
            rank.suspend()
            frozen.append(rank)
        assert max(logged_steps(run)) < LAST, f"froze {run} too late: it may be complete"
        waiting = [r for r in waiting if r[0] != run]
    return frozen


def lose_node2(env: dict, frozen: list[psutil.Process]) -> None:
    """Every process of node2 killed at once; node1's ranks then go on into the lost peer."""
    lost = subprocess.run([SCRIPT, "kill-node", "2"], env=env, capture_output=True, text=True, timeout=60)
    assert lost.returncode == 0, lost.stderr
    for rank in frozen:
        try:
            rank.resume()
        except psutil.NoSuchProcess:  # node2's rank
            pass


def bring_node2_back(env: dict) -> None:
    back = subprocess.run([SCRIPT, "start-node", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert back.returncode == 0, back.stdout + back.stderr


def slurm_job_state(env: dict, job: str) -> str:
    fields = slurm_job(env, job)
    return f"{fields.get('JobState', 'gone')} restarts={fields.get('Restarts', '?')}"


def ray_job_status(env: dict, job: str) -> str:
    out = subprocess.run([RAY, "job", "status", "--address", env["RAY_ADDRESS"], job], env=env, capture_output=True,
                         text=True, timeout=60)
    return next((s for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if s in (out.stdout + out.stderr)
                 .upper()), "?")


def test_losing_node2_mid_run_requeues_the_sbatch_job_and_restarts_the_ray_run_both_bitwise(
        cluster, shards, sbatch_two_node_run, ray_two_node_run, tmp_path):
    """One node loss, two runs on the cluster at once (SLURM and Ray keep their own books).
    SLURM notices the silent node (SlurmdTimeout) and requeues the job (--requeue); it
    starts again once node2 is back and resumes from the checkpoint in the run dir, and
    node1's rank stops with one line, not a traceback. Ray Train's FailureConfig restarts
    the worker group, which waits for a second node and resumes from Ray's storage."""
    env, _ = cluster
    slurm_run, log, ray_run, ray_job = tmp_path / "sbatch", tmp_path / "job.out", tmp_path / "run", \
        f"dd-node-loss-{os.getpid()}"
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                          "--cpus-per-task=1", f"--output={log}", "slurm/train_latent.sh", "configs/tiny.yaml", *TRAIN,
                          f"train.run_dir={slurm_run}", f"data.shards={shards}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    submitted = subprocess.run([*ray_train_on_two_nodes(env, ray_run, shards, "--no-wait", "--submission-id", ray_job),
                                "launch.max_failures=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert submitted.returncode == 0, submitted.stderr
        lose_node2(env, freeze_both_after_their_first_checkpoint([
            (slurm_run, slurm_run / f"checkpoints/step{CKPT_EVERY:08d}",
             lambda: processes("dist_diffusion.train", str(slurm_run))),
            (ray_run, ray_run / f"ray/run/step{CKPT_EVERY:08d}", lambda: processes("RayTrainWorker"))]))
        wait_until(lambda: slurm_job_state(env, job_id) == "PENDING restarts=1", 300, "SLURM to requeue the job")
        bring_node2_back(env)
        # A requeued job waits SLURM_CRED_EXPIRE (90 s here) before it may start again; the
        # test lifts it once slurmctld has sent node2 the signal it still owes the lost step.
        # Not checked: on a slow machine the back-off may have ended and the job started already.
        lift_requeue_backoff(env, job_id, check=False)
        wait_until(lambda: slurm_job(env, job_id).get("JobState", "gone") in (*SLURM_ENDED, "gone")
                   and ray_job_status(env, ray_job) in ("SUCCEEDED", "FAILED", "STOPPED"), 500, "both runs to end",
                   interval=1)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
        subprocess.run([RAY, "job", "stop", "--address", env["RAY_ADDRESS"], ray_job], env=env, capture_output=True,
                       timeout=60)
    text = log.read_text(errors="replace")
    assert slurm_job_state(env, job_id) == "COMPLETED restarts=1", text[-3000:]
    assert "error: rank 0 of 2 lost contact with another rank mid-run" in text and "Traceback" not in text, text[-3000:]
    assert f"resumed from {slurm_run}/checkpoints/step{CKPT_EVERY:08d} at step {CKPT_EVERY}" in text
    assert_bitwise_the_uninterrupted_run(slurm_run, sbatch_two_node_run[0])
    logs = subprocess.run([RAY, "job", "logs", "--address", env["RAY_ADDRESS"], ray_job], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert ray_job_status(env, ray_job) == "SUCCEEDED", logs[-4000:]
    assert f"resumed from {ray_run}/checkpoints/step{CKPT_EVERY:08d} at step {CKPT_EVERY}" in logs, logs[-4000:]
    assert_bitwise_the_uninterrupted_run(ray_run, ray_two_node_run[0])


def test_a_collective_whose_peer_died_is_named_as_such_and_other_errors_are_not():
    from dist_diffusion.runtime.distributed import PeerLost, as_peer_lost

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.7.0.12]:44703. This is "
                        "typically caused by a remote worker crashing.\nmore")
    lost = as_peer_lost(gloo)
    assert isinstance(lost, PeerLost) and "\n" not in str(lost)
    assert "lost contact with another rank mid-run (" in str(lost) and "[10.7.0.12]:44703" in str(lost)
    assert "resumes from its newest complete checkpoint" in str(lost)
    assert as_peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
