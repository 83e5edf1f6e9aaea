"""Post-hoc EMA: power-function EMA profiles and the reconstruction of an EMA of any
length from snapshots of them (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", EDM2, section 3 and appendix C). Pure math on numbers and
tensors; which tensors (full copies, ZeRO-3 partitions) is the runtime's choice.

The profile. After t optimizer steps (t = 1, 2, ...), with weights theta_1..theta_t, the
power-function EMA of exponent gamma is

    ema_t = beta_t * ema_{t-1} + (1 - beta_t) * theta_t,    beta_t = (1 - 1/t)^(gamma + 1)   (EDM2 eq. 3)

(beta_1 = 0: the first step sets it). Unrolled, theta_s gets the weight
(1 - beta_s) * prod_{u=s+1..t} beta_u; the product telescopes (prod (u-1)/u = s/t), so

    w_t(s) = (s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1),    s = 1..t,

which is exactly the integral over (s-1, s] of the continuous profile

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma+1)   on [0, t],

the average of theta(tau) with weight tau^gamma. Its standard deviation relative to its
length t is sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))) (EDM2 eq. 4): gamma = 16.97
for sigma_rel 0.05, 6.94 for 0.10.

Reconstruction. Snapshots of profiles (t_i, gamma_i) hold integrals of theta against p_i.
A profile (t_r, gamma_r) never tracked is approximated by sum_i x_i p_i, the x that
minimises the L2 distance int (sum_i x_i p_i - p_r)^2 dtau: the normal equations
A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_r>, and for two profiles

    <p_a, p_b> = int_0^min(t_a,t_b) (g_a+1)(g_b+1) tau^(g_a+g_b) / (t_a^(g_a+1) t_b^(g_b+1)) dtau
               = (g_a+1)(g_b+1) m^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)),  m = min(t_a, t_b).

Scaling every time by c scales every inner product by 1/c and leaves x unchanged, so times
are divided by the latest one first (the Gram matrix stays near 1 in scale). The result
applied to the snapshots, sum_i x_i snapshot_i, is elementwise: a partition of the weights
reconstructs from the same partitions of the snapshots.

Error. Since the discrete kernels are the profiles integrated over steps, the
reconstruction's error on a weight trajectory is exactly sum_s r(s) theta_s with
r(s) = sum_i x_i w_i(s) - w_r(s). For any constant c (take theta at the target step):

    |reconstructed - tracked| <= sum_s |r(s)| |theta_s - c| + |sum_s r(s)| |c|,

per coordinate (:func:`error_bound` gives the two residual norms it needs).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has relative width ``sigma_rel``: the largest real root
    of (gamma+1) = sigma_rel^2 (gamma+2)^2 (gamma+3), i.e., dividing by sigma_rel^2,
    gamma^3 + 7 gamma^2 + (16 - 1/sigma_rel^2) gamma + (12 - 1/sigma_rel^2) = 0."""
    if not 0 < sigma_rel < 0.289:  # gamma -> -1 as sigma_rel -> sqrt(1/12), the uniform average
        raise ValueError(f"sigma_rel={sigma_rel} must be in (0, 0.289)")
    k = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - k, 12.0 - k]).real.max())


def sigma_rel_from_gamma(gamma: float) -> float:
    """EDM2 eq. 4."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_beta(step: int, gamma: float) -> float:
    """beta_t of the update after ``step`` optimizer steps (1-based: the first step gives 0)."""
    if step < 1:
        raise ValueError(f"step={step}: the profile counts steps from 1")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


@torch.no_grad()
def power_ema_update_(profile: torch.Tensor, current: torch.Tensor, step: int, gamma: float) -> None:
    """In place, one fused lerp: profile <- beta_t profile + (1 - beta_t) current."""
    profile.lerp_(current.to(profile.dtype), 1.0 - power_beta(step, gamma))


def profile_inner(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """<p_a, p_b>, the closed form above (in logs: t^(gamma+1) overflows for long runs)."""
    m = min(t_a, t_b)
    log = (g_a + g_b + 1) * np.log(m) - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b)
    return float((g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * np.exp(log))


def reconstruction_weights(snapshots: Sequence[tuple[float, float]], target: tuple[float, float]) -> np.ndarray:
    """x with sum_i x_i p_i closest to p_target in L2; ``snapshots`` and ``target`` are
    (step, gamma) pairs. Least squares (lstsq), since snapshots close in time make A nearly
    singular."""
    if not snapshots:
        raise ValueError("post-hoc EMA needs at least one snapshot")
    scale = max(max(t for t, _ in snapshots), target[0])
    points = [(t / scale, g) for t, g in snapshots]
    t_r, g_r = target[0] / scale, target[1]
    gram = np.array([[profile_inner(ta, ga, tb, gb) for tb, gb in points] for ta, ga in points])
    rhs = np.array([profile_inner(ta, ga, t_r, g_r) for ta, ga in points])
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def discrete_kernel(step: int, gamma: float, length: int) -> np.ndarray:
    """w_step(s) for s = 1..length (zero past ``step``): the weight of theta_s in the
    profile after ``step`` steps."""
    s = np.arange(1, length + 1, dtype=np.float64)
    s_done = np.minimum(s, step)
    kernel = np.exp((gamma + 1) * (np.log(s_done) - np.log(step))) - \
        np.exp((gamma + 1) * (np.log(np.maximum(s_done - 1, 1e-300)) - np.log(step)))
    kernel[0] = (1.0 / step) ** (gamma + 1)  # s = 1: 1^(g+1) - 0
    return np.where(s <= step, kernel, 0.0)


def error_bound(snapshots: Sequence[tuple[int, float]], target: tuple[int, float],
                weights: np.ndarray) -> tuple[float, float]:
    """(sum_s |r(s)|, |sum_s r(s)|) of the reconstruction's residual kernel r (module doc):
    the reconstruction of a trajectory theta is off by at most
    first * max_s |theta_s - c| + second * |c|, per coordinate, for any constant c."""
    length = max(max(t for t, _ in snapshots), target[0])
    residual = sum(x * discrete_kernel(t, g, length) for x, (t, g) in zip(weights, snapshots))
    residual = residual - discrete_kernel(target[0], target[1], length)
    return float(np.abs(residual).sum()), float(abs(residual.sum()))


@torch.no_grad()
def combine(snapshots: Sequence[torch.Tensor], weights: np.ndarray) -> torch.Tensor:
    """sum_i x_i snapshot_i, elementwise in float64 in snapshot order: a partition of the
    weights gives exactly the same bits as the whole."""
    out = torch.zeros_like(snapshots[0], dtype=torch.float64)
    for x, snapshot in zip(weights, snapshots):
        out.add_(snapshot.double(), alpha=float(x))
    return out.to(snapshots[0].dtype)
