"""Rectified flow (diffusion.process=rectified_flow) through the forward-process seam: its
path and target, the Euler loop against diffusers' FlowMatchEulerDiscreteScheduler (what the
export carries), Heun's order, the guidance interval, the config's refusals, and a 2-process
training run whose export samples the same images on 1 and 2 processes."""

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

from conftest import diffusers_cfg_loop, make_class_folders, run_dist_diffusion
from dist_diffusion.config import ConfigError, DataConfig, load_config, unet_input_shape
from dist_diffusion.config.registry import SAMPLERS
from dist_diffusion.core.generate import generate
from dist_diffusion.core.guidance import Guidance
from dist_diffusion.core.models import build_unet
from dist_diffusion.core.processes import make_process
from dist_diffusion.core.samplers import per_sample_randn, sample_generators, sampler

ROOT = Path(__file__).resolve().parents[1]
FLOW = ["diffusion.process=rectified_flow", "diffusion.prediction=v", "sample.sampler=flow_euler"]
PIXELS = ["vae.enabled=false", "data.resolution=16", "model.num_classes=4"]


def flow_config(*overrides):
    return load_config(ROOT / "configs/tiny.yaml", [*PIXELS, *FLOW, *overrides])


def test_the_path_its_velocity_and_the_split_back_to_data_and_noise():
    process = make_process(flow_config().diffusion)
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = process.noised(x0, noise, t)
    assert torch.allclose(x_t[0], x0[0]) and torch.allclose(x_t[3], noise[3])
    assert torch.allclose(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    v = process.target(x0, noise, t)
    assert torch.equal(v, noise - x0)
    x0_hat, noise_hat = process.split(v, x_t, t)
    assert torch.allclose(x0_hat, x0, atol=1e-6) and torch.allclose(noise_hat, noise, atol=1e-6)
    assert process.network_time(t).tolist() == [0.0, 250.0, 500.0, 1000.0]  # what SD3 feeds its network
    assert torch.equal(process.noise_level(t), t)


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
def test_training_times_follow_the_configured_distribution(distribution):
    cfg = flow_config(f"diffusion.time_distribution={distribution}", "diffusion.logit_mean=0.5",
                      "diffusion.logit_std=0.8")
    t = make_process(cfg.diffusion).sample_time(200_000, torch.Generator().manual_seed(0))
    assert t.shape == (200_000,) and 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    if distribution == "uniform":
        assert abs(t.mean() - 0.5) < 0.005 and abs((t < 0.25).float().mean() - 0.25) < 0.005
    else:  # SD3 sec. 3.1: logit(t) ~ N(m, s^2)
        assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 0.8) < 0.01


@pytest.mark.parametrize("steps", [1, 7, 28])
def test_euler_equals_a_diffusers_loop_with_the_exported_scheduler(tmp_path, steps):
    from dist_diffusion.export import write_export

    cfg = flow_config(f"sample.steps={steps}")
    torch.manual_seed(0)
    out = write_export(build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).eval(), cfg, tmp_path / "unet", {"weights": "random"})
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.shift == 1.0 and scheduler.config.num_train_timesteps == 1000
    meta = json.loads((out / "dist_diffusion.json").read_text())
    assert meta["process"] == "rectified_flow" and meta["prediction"] == "v"
    unet, indices, labels = UNet2DModel.from_pretrained(out).eval(), range(5), torch.arange(5) % 4
    noise = per_sample_randn(sample_generators(cfg.sample.seed, indices), (3, 16, 16))
    theirs = diffusers_cfg_loop(unet, scheduler, noise, labels, 4, cfg.sample.guidance_scale, steps)
    ours = generate(cfg.sample, cfg.diffusion, unet, labels, indices)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_the_pixel_export_loads_as_our_pipeline_and_samples_like_ours(tmp_path):
    from dist_diffusion.export import write_export
    from dist_diffusion.export.pipeline import ClassConditionalLatentPipeline

    cfg = flow_config("sample.steps=6")
    torch.manual_seed(0)
    out = write_export(build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).eval(), cfg, tmp_path / "unet", {"weights": "random"})
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"] and index["latent_space"] is False
    pipe = ClassConditionalLatentPipeline.from_pretrained(out)
    labels = torch.tensor([0, 3])
    noise = per_sample_randn(sample_generators(cfg.sample.seed, range(2)), (3, 16, 16))
    theirs = pipe(labels, guidance_scale=cfg.sample.guidance_scale, num_inference_steps=6, latents=noise,
                  output_type="latent").images
    ours = generate(cfg.sample, cfg.diffusion, UNet2DModel.from_pretrained(out).eval(), labels, range(2))
    assert (ours - theirs).abs().max().item() <= 1e-5


def linear_field(rate: float, calls: list):
    """v(x, t) = rate x: the ODE dx/dt = rate x from t = 1 to 0 ends at x(1) exp(-rate)."""
    def model(x, t, labels):
        calls.append(x.shape[0])
        return rate * x
    return model


def test_heun_is_second_order_and_costs_two_evaluations_a_step_but_the_last():
    process, noise = make_process(flow_config().diffusion), torch.randn(2, 3, 4, 4)
    exact, errors = noise * math.exp(-1.5), {}
    for name in ("flow_euler", "flow_heun"):
        for steps in (10, 20):
            calls = []
            x = sampler(name)(linear_field(1.5, calls), process, noise, torch.tensor([0, 1]), Guidance(4, 1.0),
                              flow_config(f"sample.steps={steps}").sample, None)
            errors[name, steps] = (x - exact).abs().max().item()
            assert len(calls) == SAMPLERS[name].network_evaluations(steps, 1000)
    assert errors["flow_heun", 20] < errors["flow_euler", 20] / 20
    assert errors["flow_euler", 10] / errors["flow_euler", 20] == pytest.approx(2, rel=0.2)  # first order
    assert errors["flow_heun", 10] / errors["flow_heun", 20] == pytest.approx(4, rel=0.3)  # second order
    assert SAMPLERS["flow_heun"].network_evaluations(20, 1000) == 39


def test_the_guidance_interval_maps_onto_the_same_share_of_the_way_to_noise():
    """[lo, hi] in 0..T-1 guides the times lo/(T-1) <= t <= hi/(T-1); every step with [0, T-1]."""
    process, noise, labels = make_process(flow_config().diffusion), torch.randn(1, 3, 4, 4), torch.tensor([1])
    sample = flow_config("sample.steps=10").sample
    grid = process.times(10)[:-1]
    middle = int(((grid >= 300 / 999) & (grid <= 700 / 999)).sum())
    assert 0 < middle < 10
    for interval, guided in [((0, 999), 10), ((300, 700), middle), (None, 10)]:
        calls = []
        guidance = Guidance(4, 3.0, interval)
        sampler("flow_euler")(linear_field(1.0, calls), process, noise, labels, guidance, sample, None)
        assert calls.count(2) == guided and len(calls) == 10, interval  # a guided step is one batch of 2


@pytest.mark.parametrize("overrides,message", [
    (["diffusion.prediction=epsilon"], "diffusion.process=rectified_flow learns the velocity eps - x0: set "
                                       "diffusion.prediction=v"),
    (["diffusion.snr_shift=2"], "diffusion.snr_shift=2"),
    (["diffusion.schedule=cosine"], "diffusion.schedule=cosine"),
    (["diffusion.min_snr_gamma=5"], "diffusion.min_snr_gamma=5"),
    (["sample.sampler=ddim"], "sample.sampler ddim samples the ddpm process, not diffusion.process=rectified_flow: "
                              "choose one of ['flow_euler', 'flow_heun']"),
    (["eval.samplers=[flow_euler,dpm_solver_2m:20]"], "eval.samplers entry dpm_solver_2m samples the ddpm process"),
])
def test_rectified_flow_refuses_what_makes_no_sense_with_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match="^config from overrides: .*" + message.replace("[", r"\[").replace(
            "]", r"\]").replace("(", r"\(")):
        load_config(None, [*FLOW, *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["sample.sampler=flow_heun"], "sample.sampler flow_heun samples the rectified_flow process, not "
                                   "diffusion.process=ddpm"),
    (["diffusion.time_distribution=logit_normal"], "diffusion.time_distribution=logit_normal"),
])
def test_ddpm_refuses_the_rectified_flow_parts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_ddpm_config_refuses_a_rectified_flow_export(tmp_path):
    from dist_diffusion.evaluate.sample import check_unet_dir
    from dist_diffusion.export import write_export

    cfg = flow_config()
    write_export(build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).eval(), cfg, tmp_path / "unet", {"weights": "random"})
    ddpm = load_config(ROOT / "configs/tiny.yaml", [*PIXELS, f"eval.unet={tmp_path / 'unet'}"])
    with pytest.raises(ConfigError, match="it learned diffusion.process='rectified_flow', this config has 'ddpm'"):
        check_unet_dir(ddpm.eval.unet, unet_input_shape(ddpm.vae, ddpm.data), ddpm.diffusion)


# ---- a 2-process training run, and its export sampled on 1 and 2 processes ----

TRAIN = ["train.batch_size=16", "train.warmup_steps=2", "train.lr=2e-3", "train.log_every=1",
         "data.num_workers=0", "data.hflip=false", "runtime.zero_stage=2", "train.max_steps=40",
         "diffusion.time_distribution=logit_normal"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dist_diffusion.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("flow")
    src = make_class_folders(tmp / "src", classes=4, per_class=40)
    prepare(src, str(tmp / "img16"), DataConfig(resolution=16, samples_per_shard=40), progress=False)
    run = tmp / "run"
    done = run_dist_diffusion(["train", "--config", "configs/tiny.yaml", "--nproc", "2", f"train.run_dir={run}",
                               f"data.shards={tmp / 'img16'}", *PIXELS, *FLOW, *TRAIN], timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    done = run_dist_diffusion(["export", "--run-dir", str(run), "--out", str(tmp / "unet")], timeout=300)
    assert done.returncode == 0, done.stderr
    return tmp


def test_rectified_flow_training_loss_falls_on_two_processes(trained):
    rows = [json.loads(line) for line in (trained / "run/metrics.jsonl").read_text().splitlines()]
    curve = [row["loss"] for row in rows]
    assert len(curve) == 40 and sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5, curve
    # the loss by noise level: every quarter of t in [0, 1] drew samples over the run
    assert all(any(row[f"loss_q{q}"] is not None for row in rows) for q in range(1, 5))
    assert json.loads((trained / "unet/dist_diffusion.json").read_text())["process"] == "rectified_flow"


def sample_tars(out: Path) -> dict:
    found = {}
    for path in sorted(out.glob("*/samples-*.tar")):
        with tarfile.open(path) as tar:
            found[f"{path.parent.name}/{path.name}"] = sorted(
                (m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile())
    return found


def test_rectified_flow_sampling_is_bitwise_on_1_and_2_processes(trained):
    """Euler and Heun with CFG and a guidance interval: the same PNG bytes from either count."""
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = trained / f"eval-{nproc}"
        done = run_dist_diffusion(["eval", "--config", "configs/tiny.yaml", "--nproc", str(nproc), *PIXELS, *FLOW,
                                   f"eval.unet={trained / 'unet'}", f"eval.out={outs[nproc]}", "eval.metrics=false",
                                   "sample.num_samples=12", "eval.samples_per_shard=4", "sample.batch_size=4",
                                   "eval.samplers=[flow_euler:6,flow_heun:4]", "eval.guidance_scales=[3]",
                                   "sample.guidance_interval=[100,800]"], timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    one, two = sample_tars(outs[1]), sample_tars(outs[2])
    assert len(one) == 6 and one == two
    report = json.loads((outs[1] / "report.json").read_text())["results"]
    assert {(r["sampler"], r["nfe"]) for r in report} == {("flow_euler", 6), ("flow_heun", 7)}
