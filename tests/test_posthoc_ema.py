"""Post-hoc EMA's math (core/posthoc_ema.py): the power-function profile's update rule
against its closed-form kernel, EDM2's gamma <-> sigma_rel, and the reconstruction of a
profile never tracked from snapshots of two others, within the bound the module derives."""

import numpy as np
import pytest
import torch

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
