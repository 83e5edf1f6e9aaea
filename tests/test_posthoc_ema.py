"""Post-hoc EMA's math (core/posthoc_ema.py): the power-function profile's update rule
against its closed-form kernel, EDM2's gamma <-> sigma_rel, and the reconstruction of a
profile never tracked from snapshots of two others, within the bound the module derives."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import PIXEL16, make_class_folders, run_dist_diffusion

from dist_diffusion.core.posthoc_ema import (combine, discrete_kernel, error_bound, gamma_from_sigma_rel,
                                             power_beta, power_ema_update_, reconstruction_weights,
                                             sigma_rel_from_gamma)


def test_gamma_and_sigma_rel_are_edm2s_pair():
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's two profiles
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma in (0.01, 0.05, 0.13, 0.25):
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(sigma)) == pytest.approx(sigma, rel=1e-9)
    with pytest.raises(ValueError):
        gamma_from_sigma_rel(0.3)


def test_update_rule_is_the_closed_form_kernel_of_a_direct_loop():
    gamma, steps = gamma_from_sigma_rel(0.1), 300
    theta = torch.randn(steps, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fused, loop = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for t in range(1, steps + 1):
        power_ema_update_(fused, theta[t - 1], t, gamma)
        beta = (1 - 1 / t) ** (gamma + 1)  # EDM2 eq. 3, written out
        loop = beta * loop + (1 - beta) * theta[t - 1]
    assert power_beta(1, gamma) == 0.0 and torch.allclose(fused, loop, rtol=0, atol=1e-12)
    kernel = torch.from_numpy(discrete_kernel(steps, gamma, steps))
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose((kernel[:, None] * theta).sum(0), fused, rtol=0, atol=1e-12)


def trajectory(steps: int, width: int) -> np.ndarray:
    """A random walk plus drift: the weights of a run that still moves."""
    rng = np.random.default_rng(0)
    return np.cumsum(rng.normal(size=(steps, width)) * 0.01 + 0.002, axis=0)


def tracked(theta: np.ndarray, gamma: float, every: int) -> tuple[np.ndarray, list]:
    """The profile after the last step, and its snapshots (step, gamma, values) every ``every``."""
    ema, snapshots = np.zeros(theta.shape[1]), []
    for t in range(1, len(theta) + 1):
        beta = power_beta(t, gamma)
        ema = beta * ema + (1 - beta) * theta[t - 1]
        if t % every == 0:
            snapshots.append((t, gamma, ema.copy()))
    return ema, snapshots


def test_reconstruction_of_an_untracked_length_stays_within_the_bound_and_improves_with_snapshots():
    """Profiles 0.05 and 0.10 tracked; 0.07, never tracked, reconstructed at the last step.
    The bound (module doc): |error| <= sum|r| max|theta_s - theta_T| + |sum r| |theta_T|."""
    theta = trajectory(2000, 64)
    target = gamma_from_sigma_rel(0.07)
    direct, _ = tracked(theta, target, len(theta))
    errors, bounds = [], []
    for every in (400, 200, 100, 50):
        snapshots = [s for sigma in (0.05, 0.10) for s in tracked(theta, gamma_from_sigma_rel(sigma), every)[1]]
        points = [(t, g) for t, g, _ in snapshots]
        x = reconstruction_weights(points, (len(theta), target))
        rebuilt = sum(xi * values for xi, (_, _, values) in zip(x, snapshots))
        l1, total = error_bound(points, (len(theta), target), x)
        bound = l1 * np.abs(theta - theta[-1]).max(0) + total * np.abs(theta[-1])
        error = np.abs(rebuilt - direct)
        assert (error <= bound).all()
        errors.append(error.max())
        bounds.append(bound.max())
    assert errors == sorted(errors, reverse=True) and bounds == sorted(bounds, reverse=True)
    assert errors[-1] < 1e-4 < errors[0]  # 80 snapshots: within 1e-4 of weights that moved ~4


def test_a_partition_reconstructs_to_the_same_bits_as_the_whole():
    snapshots = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    x = reconstruction_weights([(100 * (i % 3 + 1), 6.94 if i < 3 else 16.97) for i in range(6)], (250, 10.0))
    whole = combine(snapshots, x)
    parts = torch.cat([combine([s[:600] for s in snapshots], x), combine([s[600:] for s in snapshots], x)])
    assert torch.equal(whole, parts) and whole.dtype == torch.float32


# ---- a real run: 2 ranks, ZeRO-3, two profiles, snapshots with every checkpoint ---------------

def train_args(shards, run_dir, max_steps: int) -> list[str]:
    return ["train", "--config", "configs/tiny.yaml", "--nproc", "2", *PIXEL16, f"data.shards={shards}",
            f"train.max_steps={max_steps}", "train.ckpt_every=10", "train.keep_last=1", f"train.run_dir={run_dir}",
            "runtime.zero_stage=3", "train.ema.posthoc_sigma_rels=[0.05,0.1]"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from dist_diffusion.config import DataConfig
    from dist_diffusion.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("posthoc")
    prepare(make_class_folders(tmp / "src", classes=4, per_class=16), str(tmp / "img16"),
            DataConfig(resolution=16, samples_per_shard=32), progress=False)
    return tmp / "img16"


@pytest.fixture(scope="module")
def zero3_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    done = run_dist_diffusion(train_args(shards, run_dir, 30), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_snapshots_outlive_pruned_checkpoints_as_partitions(zero3_run):
    from dist_diffusion.runtime.checkpoint import COMPLETE

    assert sorted(p.name for p in (zero3_run / "checkpoints").glob("step*")) == ["step00000030"]  # keep_last=1
    folders = sorted((zero3_run / "ema_snapshots").glob("step*"))
    assert [f.name for f in folders] == ["step00000010", "step00000020", "step00000030"]
    for folder in folders:
        meta = json.loads((folder / COMPLETE).read_text())
        assert (meta["world_size"], meta["zero_stage"], meta["sigma_rels"]) == (2, 3, [0.05, 0.1])
        halves = [load_file(str(folder / f"posthoc_ema_rank{r:03d}.safetensors")) for r in range(2)]
        assert halves[0].keys() == halves[1].keys() and len(halves[0]) > 10
        name = next(iter(halves[0]))
        assert halves[0][name].shape == halves[1][name].shape  # each rank its own partition
    last = zero3_run / "checkpoints/step00000030/posthoc_ema_rank001.safetensors"
    assert os.path.samefile(last, zero3_run / "ema_snapshots/step00000030/posthoc_ema_rank001.safetensors")


@pytest.mark.slow
def test_partitioned_reconstruction_equals_the_gathered_one_bitwise(zero3_run, tmp_path):
    from dist_diffusion.export.posthoc import plan, reconstruct_files
    from dist_diffusion.runtime.ema import join_partitions

    p = plan(zero3_run, 0.07)
    reconstruct_files(p, tmp_path)  # one rank's partitions at a time
    parts = [load_file(str(tmp_path / f"ema_rank{r:03d}.safetensors")) for r in range(2)]
    for name in parts[0]:
        flat = torch.cat([parts[0][name].flatten(), parts[1][name].flatten()])
        gathered = [torch.cat([load_file(str(s.folder / f"posthoc_ema_rank{r:03d}.safetensors"))[f"{key}/{name}"]
                               .flatten() for r in range(2)]) for s, key in p.terms]
        assert torch.equal(flat, combine(gathered, np.array(p.weights)))
    assert join_partitions([parts[0][name], parts[1][name]], (flat.numel(),)).shape == flat.shape


@pytest.mark.slow
def test_ema_reconstruct_exports_and_a_tracked_length_reconstructs_to_itself(zero3_run, tmp_path):
    from diffusers import UNet2DModel

    from dist_diffusion.export.posthoc import plan

    tracked = plan(zero3_run, 0.10)
    own = [w for (s, key), w in zip(tracked.terms, tracked.weights) if s.step == 30 and key == "sigma_rel_0.1"]
    assert own[0] == pytest.approx(1.0, abs=1e-6) and tracked.bound[0] < 1e-5
    done = run_dist_diffusion(["ema-reconstruct", "--run-dir", str(zero3_run), "--sigma-rel", "0.07",
                               "--out", str(tmp_path / "ema007")])
    assert done.returncode == 0 and "sigma_rel 0.07 at step 30" in done.stdout, done.stderr[-2000:]
    record = json.loads((tmp_path / "ema007/dist_diffusion.json").read_text())["posthoc_ema"]
    assert record["sigma_rel"] == 0.07 and len(record["snapshots"]) == 6
    assert sum(s["weight"] for s in record["snapshots"]) == pytest.approx(1.0, abs=0.05)
    UNet2DModel.from_pretrained(tmp_path / "ema007")  # a normal export


@pytest.mark.slow
def test_exact_resume_keeps_the_profiles_bitwise(zero3_run, shards, tmp_path):
    run_dir = tmp_path / "resumed"
    for steps in (20, 30):  # stopped at 20, resumed to 30
        done = run_dist_diffusion(train_args(shards, run_dir, steps), timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    whole, resumed = joined_profiles(zero3_run), joined_profiles(run_dir)
    assert len(whole) == 2 * 145 and whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def joined_profiles(run_dir) -> dict:
    """Each profile's parameters at step 30, joined from the two ranks' partitions (the
    partitions' padding past a parameter's end is not part of it)."""
    from dist_diffusion.config import load_config
    from dist_diffusion.train.objectives import objective
    from dist_diffusion.runtime.ema import join_partitions

    shapes = dict((n, p.shape) for n, p in objective(load_config(run_dir / "config.yaml")).build().named_parameters())
    parts = [load_file(str(run_dir / f"checkpoints/step00000030/posthoc_ema_rank{r:03d}.safetensors"))
             for r in range(2)]
    return {key: join_partitions([part[key] for part in parts], shapes[key.split("/", 1)[1]]) for key in parts[0]}


def test_profiles_cannot_start_mid_run(tmp_path):
    from dist_diffusion.config import ConfigError
    from dist_diffusion.runtime.checkpoint import _profiles_path

    with pytest.raises(ConfigError, match="cannot start mid-run"):
        _profiles_path(tmp_path, 0)


@pytest.mark.slow
def test_eval_sweeps_ema_lengths_and_plots_fid_against_them(zero3_run, shards, tmp_path):
    from dist_diffusion.config import load_config
    from dist_diffusion.core.models import build_classifier

    cfg = load_config(zero3_run / "config.yaml")
    torch.manual_seed(0)
    build_classifier(cfg.model, cfg.data).save_pretrained(tmp_path / "classifier")
    out = tmp_path / "sweep"
    done = run_dist_diffusion(["eval", "--config", str(zero3_run / "config.yaml"), "--nproc", "2",
                               "eval.ema_sigma_rels=[0.05,0.07,0.1]", f"eval.classifier={tmp_path / 'classifier'}",
                               f"eval.reference={shards}", f"eval.out={out}", "sample.num_samples=16",
                               "eval.samples_per_shard=8", "sample.batch_size=8", "sample.steps=4"], timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads((out / "report.json").read_text())["results"]
    assert [r["ema_sigma_rel"] for r in rows] == [0.05, 0.07, 0.1] and all(r["fid"] > 0 for r in rows)
    assert len({r["fid"] for r in rows}) == 3  # three different EMAs
    assert (out / "fid_vs_ema_length.png").stat().st_size > 5000 and "| sigma_rel |" in (out / "report.md").read_text()
    assert json.loads((out / "ema-0.07/unet/dist_diffusion.json").read_text())["posthoc_ema"]["sigma_rel"] == 0.07
