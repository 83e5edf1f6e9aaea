"""Our samplers against diffusers' schedulers on the same tiny model, noise and generators."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from dist_diffusion.core.guidance import Guidance, guided_output
from dist_diffusion.core.samplers import (MULTISTEP, SAMPLERS, ddim_sample, ddpm_sample, dpm_solver_2m_sample,
                                          make_timesteps, run_sampler, sample_generators, unipc_sample)
from dist_diffusion.core.schedule import DEFAULT_BETAS, make_schedule

from conftest import make_tiny_model

NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PRED = {"epsilon": "epsilon", "v": "v_prediction"}
NUM_CLASSES = 4
SHAPE = (3, 8, 8)


def scheduler_kwargs(schedule, prediction, T=1000):
    lo, hi = DEFAULT_BETAS.get(schedule, (1e-4, 0.02))
    return dict(num_train_timesteps=T, beta_schedule=NAMES[schedule], beta_start=lo, beta_end=hi,
                prediction_type=PRED[prediction])


def start(n=3, seed=7):
    gens = sample_generators(seed, range(n))
    noise = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
    labels = torch.arange(n) % NUM_CLASSES
    return noise, labels, gens


def reference_loop(scheduler, model, noise, labels, **step_kwargs):
    x = noise.clone()
    for t in scheduler.timesteps:
        out = model(x, torch.full((x.shape[0],), int(t)), labels)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("schedule,prediction", [("linear", "epsilon"), ("cosine", "v")])
def test_ddpm_equals_diffusers(schedule, prediction):
    tiny_model = make_tiny_model(schedule, prediction)
    noise, labels, gens = start()
    ours = ddpm_sample(tiny_model, make_schedule(schedule), noise, labels, Guidance(NUM_CLASSES),
                       gens, prediction=prediction)
    ref_sched = DDPMScheduler(clip_sample=False, **scheduler_kwargs(schedule, prediction))
    ref_sched.set_timesteps(1000)
    _, _, ref_gens = start()
    ref = reference_loop(ref_sched, tiny_model, noise, labels, generator=ref_gens)
    assert max_diff(ours, ref) <= 1e-5


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [10, 50, 250])
def test_ddim_equals_diffusers(spacing, eta, steps):
    schedule, prediction = ("scaled_linear", "epsilon") if steps != 50 else ("linear", "v")
    tiny_model = make_tiny_model(schedule, prediction)
    noise, labels, gens = start()
    sched = make_schedule(schedule)
    ts = make_timesteps(1000, steps, spacing)
    ours = ddim_sample(tiny_model, sched, ts, noise, labels, Guidance(NUM_CLASSES), eta=eta,
                       generators=gens, prediction=prediction)
    ref_sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing,
                              **scheduler_kwargs(schedule, prediction))
    ref_sched.set_timesteps(steps)
    assert torch.equal(ts, ref_sched.timesteps)
    _, _, ref_gens = start()
    ref = reference_loop(ref_sched, tiny_model, noise, labels, eta=eta, generator=ref_gens)
    assert max_diff(ours, ref) <= 1e-5


def test_ddim_clip_x0_equals_diffusers_clip_sample(tiny_model):
    noise, labels, _ = start()
    ts = make_timesteps(1000, 20, "leading")
    ours = ddim_sample(tiny_model, make_schedule("linear"), ts, 3 * noise, labels,
                       Guidance(NUM_CLASSES), clip_x0=True)
    ref_sched = DDIMScheduler(clip_sample=True, **scheduler_kwargs("linear", "epsilon"))
    ref_sched.set_timesteps(20)
    # ours re-derives eps from the clipped x0 (diffusers' use_clipped_model_output)
    ref = reference_loop(ref_sched, tiny_model, 3 * noise, labels, eta=0.0,
                         use_clipped_model_output=True)
    assert max_diff(ours, ref) <= 1e-5


# cosine is paired with v: at t=999 its alpha_bar is 2e-9, so an epsilon model's x0 = (x - sigma
# eps) / alpha amplifies float32 rounding 2e4-fold and no two float32 implementations agree.
@pytest.mark.parametrize("schedule,prediction,steps", [("linear", "epsilon", 10), ("linear", "epsilon", 25),
                                                       ("scaled_linear", "v", 20), ("cosine", "v", 50)])
def test_dpm_solver_2m_equals_diffusers(schedule, prediction, steps):
    tiny_model = make_tiny_model(schedule, prediction)
    noise, labels, _ = start()
    ref_sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                            **scheduler_kwargs(schedule, prediction))
    ref_sched.set_timesteps(steps)  # diffusers' default 'linspace' timesteps, given to ours as-is
    ours = dpm_solver_2m_sample(tiny_model, make_schedule(schedule), ref_sched.timesteps, noise,
                                labels, Guidance(NUM_CLASSES), prediction=prediction)
    ref = reference_loop(ref_sched, tiny_model, noise, labels)
    assert max_diff(ours, ref) <= 1e-5


SCHEDULER_OF = {"ddim": DDIMScheduler, "dpm_solver_2m": DPMSolverMultistepScheduler,
                "unipc": UniPCMultistepScheduler}


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "ddpm"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 20, 50, 333, 999])
def test_every_sampler_picks_the_timesteps_diffusers_names_the_same(name, spacing, steps):
    """The selection itself, for every sampler and spacing name: the multistep solvers lay
    leading and linspace over steps + 1 points, DDIM over steps."""
    ref_sched = SCHEDULER_OF[name](timestep_spacing=spacing)
    ref_sched.set_timesteps(steps)
    assert make_timesteps(1000, steps, spacing, multistep=name in MULTISTEP).tolist() == ref_sched.timesteps.tolist()


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("schedule,prediction,steps,spacing", [("linear", "epsilon", 10, "linspace"),
                                                               ("linear", "epsilon", 25, "leading"),
                                                               ("scaled_linear", "v", 20, "trailing"),
                                                               ("cosine", "v", 50, "linspace")])
def test_unipc_bh2_equals_diffusers(order, schedule, prediction, steps, spacing):
    tiny_model = make_tiny_model(schedule, prediction)
    noise, labels, _ = start()
    ref_sched = UniPCMultistepScheduler(solver_order=order, solver_type="bh2", timestep_spacing=spacing,
                                        **scheduler_kwargs(schedule, prediction))
    ref_sched.set_timesteps(steps)
    ours = run_sampler("unipc", tiny_model, make_schedule(schedule), noise, labels, Guidance(NUM_CLASSES),
                       steps=steps, spacing=spacing, order=order, prediction=prediction)
    ref = reference_loop(ref_sched, tiny_model, noise, labels)
    assert max_diff(ours, ref) <= 1e-5


def test_unipc_corrector_changes_the_result_and_costs_no_evaluation():
    """The corrector is live (order 2 differs from order 1, which is DDIM's first-order
    step plus a corrector) and reuses outputs: one network call per step."""
    calls = []
    model = make_tiny_model()

    def counted(x, t, y):
        calls.append(int(t[0]))
        return model(x, t, y)
    noise, labels, _ = start()
    ts = make_timesteps(1000, 12, "linspace", multistep=True)
    second = unipc_sample(counted, make_schedule("linear"), ts, noise, labels, Guidance(NUM_CLASSES), order=2)
    assert calls == ts.tolist()
    first = unipc_sample(model, make_schedule("linear"), ts, noise, labels, Guidance(NUM_CLASSES), order=1)
    assert max_diff(first, second) > 1e-4


def test_ddim_eta0_is_deterministic(tiny_model):
    noise, labels, _ = start()
    kwargs = dict(steps=20, guidance=Guidance(NUM_CLASSES, scale=3.0))
    a = run_sampler("ddim", tiny_model, make_schedule("linear"), noise, labels, **kwargs)
    b = run_sampler("ddim", tiny_model, make_schedule("linear"), noise, labels, **kwargs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,eta", [("ddim", 1.0), ("ddpm", 0.0), ("dpm_solver_2m", 0.0)])
def test_sample_alone_equals_sample_in_batch(tiny_model, name, eta):
    """Sample 2 generated alone (from its own generator) equals sample 2 of a batch of 5."""
    sched = make_schedule("linear")
    g = Guidance(NUM_CLASSES, scale=2.0)
    gens = sample_generators(11, range(5))
    noise = torch.stack([torch.randn(SHAPE, generator=gen) for gen in gens])
    labels = torch.tensor([0, 1, 2, 3, 1])
    batch = run_sampler(name, tiny_model, sched, noise, labels, g, steps=20, eta=eta, generators=gens)
    (alone_gen,) = sample_generators(11, [2])
    alone_noise = torch.randn(SHAPE, generator=alone_gen)[None]
    alone = run_sampler(name, tiny_model, sched, alone_noise, labels[2:3], g, steps=20, eta=eta,
                        generators=[alone_gen])
    assert max_diff(alone[0], batch[2]) <= 1e-5


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(tiny_model):
    x, labels, _ = start(4)
    null = torch.full_like(labels, NUM_CLASSES)
    t = 500
    tt = torch.full((4,), t)
    cond, uncond = tiny_model(x, tt, labels), tiny_model(x, tt, null)
    assert torch.equal(guided_output(tiny_model, x, t, labels, Guidance(NUM_CLASSES, 1.0)), cond)
    assert torch.equal(guided_output(tiny_model, x, t, labels, Guidance(NUM_CLASSES, 0.0)), uncond)
    s3 = guided_output(tiny_model, x, t, labels, Guidance(NUM_CLASSES, 3.0))
    assert torch.allclose(s3, uncond + 3.0 * (cond - uncond), atol=1e-6)
    assert not torch.allclose(s3, cond, atol=1e-3)


def test_cfg_batches_cond_and_uncond_in_one_forward():
    calls = []

    def model(x, t, y):
        calls.append(y.clone())
        return x * 0 + y[:, None, None, None].float()

    x = torch.zeros(2, *SHAPE)
    out = guided_output(model, x, 10, torch.tensor([1, 2]), Guidance(NUM_CLASSES, 2.0))
    assert len(calls) == 1 and calls[0].tolist() == [1, 2, NUM_CLASSES, NUM_CLASSES]
    assert out[:, 0, 0, 0].tolist() == [4 + 2 * (1 - 4), 4 + 2 * (2 - 4)]


def test_guidance_interval_guides_only_inside(tiny_model):
    x, labels, _ = start(2)
    g = Guidance(NUM_CLASSES, scale=4.0, interval=(100, 600))
    tt = lambda t: torch.full((2,), t)  # noqa: E731
    assert torch.equal(guided_output(tiny_model, x, 800, labels, g), tiny_model(x, tt(800), labels))
    assert torch.equal(guided_output(tiny_model, x, 50, labels, g), tiny_model(x, tt(50), labels))
    inside = guided_output(tiny_model, x, 300, labels, g)
    assert not torch.allclose(inside, tiny_model(x, tt(300), labels), atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="euler"), "unknown sampler 'euler'"),
    (dict(steps=0), "steps=0 must be between 1 and T=1000"),
    (dict(steps=1001), "steps=1001 must be between 1 and T=1000"),
    (dict(eta=1.5), r"eta=1.5 must be in \[0, 1\]"),
    (dict(spacing="random"), "unknown timestep spacing 'random'"),
])
def test_bad_sampler_arguments_fail_clearly(tiny_model, kwargs, match):
    noise, labels, gens = start(1)
    args = dict(name="ddim", steps=10, eta=0.5, spacing="leading") | kwargs
    name = args.pop("name")
    with pytest.raises(ValueError, match=match):
        run_sampler(name, tiny_model, make_schedule("linear"), noise, labels,
                    Guidance(NUM_CLASSES), generators=gens, **args)


def test_bad_guidance_fails_clearly():
    with pytest.raises(ValueError, match="interval"):
        Guidance(4, scale=2.0, interval=(500, 100))
    with pytest.raises(ValueError, match="scale"):
        Guidance(4, scale=-1.0)
