import math

import pytest
import torch
from diffusers import DDPMScheduler

from dist_diffusion.core.losses import diffusion_loss, drop_labels, min_snr_weight
from dist_diffusion.core.schedule import (DEFAULT_BETAS, add_noise, make_schedule,
                                          split_prediction, v_target)

DIFFUSERS_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("name", sorted(DIFFUSERS_NAMES))
@pytest.mark.parametrize("T", [1000, 250])
def test_schedules_equal_diffusers(name, T):
    ours = make_schedule(name, T)
    lo, hi = DEFAULT_BETAS.get(name, (1e-4, 0.02))  # diffusers defaults to DDPM's betas
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAMES[name],
                        beta_start=lo, beta_end=hi)
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)
    assert torch.allclose(ours.betas, ref.betas, atol=1e-6, rtol=0)


def test_schedule_endpoints():
    lin = make_schedule("linear")
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    sl = make_schedule("scaled_linear")
    assert sl.betas[0].item() == pytest.approx(0.00085) and sl.betas[-1].item() == pytest.approx(0.012)
    assert make_schedule("cosine").betas.max().item() == pytest.approx(0.999)


def test_bad_schedule_names_the_choices():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'.*cosine"):
        make_schedule("quadratic")


def test_forward_noising_matches_diffusers_add_noise():
    sched = make_schedule("linear")
    ref = DDPMScheduler(beta_schedule="linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    assert torch.allclose(add_noise(sched, x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-6)
    assert torch.allclose(v_target(sched, x0, eps, t), ref.get_velocity(x0, eps, t), atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_split_prediction_recovers_x0_and_eps(prediction):
    sched = make_schedule("cosine")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([5, 100, 600, 950])
    x_t = add_noise(sched, x0, eps, t)
    out = eps if prediction == "epsilon" else v_target(sched, x0, eps, t)
    x0_hat, eps_hat = split_prediction(prediction, out, x_t, sched.alphas_cumprod[t])
    assert torch.allclose(x0_hat, x0, atol=2e-3) and torch.allclose(eps_hat, eps, atol=1e-4)


def test_label_dropout_rate_within_three_sigma():
    n, p, null = 200_000, 0.1, 10
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    dropped = drop_labels(labels, p, null, torch.rand(n, generator=g))
    rate = (dropped == null).float().mean().item()
    assert abs(rate - p) < 3 * math.sqrt(p * (1 - p) / n)
    kept = dropped != null
    assert torch.equal(dropped[kept], labels[kept])


def test_loss_is_zero_for_a_perfect_epsilon_model():
    sched = make_schedule("linear")
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([1, 10, 100, 999])
    perfect = lambda x, tt, y: eps  # noqa: E731
    loss = diffusion_loss(perfect, sched, x0, torch.zeros(4, dtype=torch.long), t, eps)
    assert loss.shape == (4,) and loss.abs().max().item() == 0.0
    zero = lambda x, tt, y: torch.zeros_like(x)  # noqa: E731
    loss = diffusion_loss(zero, sched, x0, torch.zeros(4, dtype=torch.long), t, eps)
    assert torch.allclose(loss, eps.pow(2).flatten(1).mean(1))


def test_min_snr_weights():
    snr = torch.tensor([0.1, 1.0, 5.0, 100.0])
    w = min_snr_weight(snr, 5.0, "epsilon")
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 1.0, 0.05]))
    wv = min_snr_weight(snr, 5.0, "v")
    assert torch.allclose(wv, torch.tensor([0.1 / 1.1, 0.5, 5 / 6, 5 / 101]))


@pytest.mark.parametrize("name", sorted(DIFFUSERS_NAMES))
def test_snr_shift_divides_every_steps_snr_by_its_square(name):
    plain, shifted = make_schedule(name), make_schedule(name, snr_shift=2.0)
    t = torch.arange(plain.num_timesteps)
    ratio = shifted.snr(t).double() / plain.snr(t).double()
    assert torch.allclose(ratio, torch.full_like(ratio, 0.25), rtol=2e-3)
    assert ((shifted.betas > 0) & (shifted.betas < 1)).all()
    assert torch.equal(make_schedule(name, snr_shift=1.0).alphas_cumprod, plain.alphas_cumprod)


def test_a_shifted_schedule_exports_as_betas_diffusers_reproduces():
    from diffusers import DDIMScheduler

    from dist_diffusion.config import load_config
    from dist_diffusion.export import ddim_scheduler

    cfg = load_config("configs/tiny.yaml", ["diffusion.snr_shift=2"])
    exported = DDIMScheduler.from_config(ddim_scheduler(cfg.diffusion, cfg.sample).config)  # what a user loads
    ours = make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_train_timesteps, snr_shift=2.0)
    assert torch.equal(exported.alphas_cumprod, ours.alphas_cumprod)
    assert not torch.equal(exported.alphas_cumprod, make_schedule(cfg.diffusion.schedule).alphas_cumprod)
