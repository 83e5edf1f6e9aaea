"""Reverse-process samplers of the ddpm process: DDPM ancestral, DDIM, DPM-Solver++(2M) and
UniPC.

Each sampler is a pure function of (model, schedule, timesteps, initial noise, labels,
guidance, per-sample generators). There is no global RNG: every fresh Gaussian draw of
sample i comes from ``generators[i]``, so sample i comes out the same alone or in any
batch, on any number of processes. Tensors are (B, C, H, W) float32 unless noted.

Every sampler of every process is registered by name in ``dist_diffusion.config.registry``
(which also gives the config its choices) and called through :func:`sampler` with one
signature, :data:`Sampler`: the functions at the end of this module are the ddpm process's.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import torch

from ..config import SampleConfig
from ..config.registry import SAMPLERS as REGISTERED
from .guidance import Guidance, guided_output
from .losses import Denoiser
from .processes import VariancePreserving, implementation
from .schedule import SPACINGS, NoiseSchedule, make_timesteps, split_prediction  # noqa: F401 (re-exported)

SAMPLERS = tuple(name for name, entry in REGISTERED.items() if entry.process == VariancePreserving.name)
MULTISTEP = tuple(name for name in SAMPLERS if REGISTERED[name].multistep)  # grids of steps + 1 points
Progress = Callable[[Iterable], Iterable]


def sample_generators(base_seed: int, indices: Sequence[int],
                      device: str | torch.device = "cpu") -> List[torch.Generator]:
    """One generator per sample, seeded from (base_seed, sample index) through numpy's
    SeedSequence so neighbouring indices get unrelated streams."""
    gens = []
    for i in indices:
        seed = int(np.random.SeedSequence([int(base_seed), int(i)]).generate_state(1, np.uint64)[0])
        gens.append(torch.Generator(device=device).manual_seed(seed))
    return gens


def per_sample_randn(generators: Sequence[torch.Generator], shape: Sequence[int],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(generators), *shape) standard normal, row i drawn from generators[i]."""
    rows = [torch.randn(tuple(shape), generator=g, device=g.device) for g in generators]
    return torch.stack(rows).to(device)


def _check_inputs(schedule: NoiseSchedule, noise: torch.Tensor, labels: torch.Tensor,
                  generators: Optional[Sequence[torch.Generator]], needs_generators: bool) -> None:
    if labels.shape[0] != noise.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {noise.shape[0]} noise images")
    if needs_generators and (generators is None or len(generators) != noise.shape[0]):
        raise ValueError("a stochastic sampler needs one torch.Generator per sample")


def _steps(schedule: NoiseSchedule, timesteps: torch.Tensor, device, progress: Optional[Progress]):
    """(t, t_prev, alpha_bar_t, alpha_bar_prev) per step; t_prev = -1 is the clean image. The
    alpha_bar pairs are looked up in one indexing on the schedule's device and moved to
    ``device`` once, so no step copies an index or a value between host and GPU."""
    pairs = list(zip(timesteps.tolist(), timesteps.tolist()[1:] + [-1]))
    where = schedule.alphas_cumprod.device
    table = schedule.alpha_bar(torch.tensor(pairs, dtype=torch.long).reshape(-1).to(where)).reshape(-1, 2).to(device)
    steps = [(t, t_prev, table[i, 0], table[i, 1]) for i, (t, t_prev) in enumerate(pairs)]
    return progress(steps) if progress else steps


def ddpm_sample(model: Denoiser, schedule: NoiseSchedule, noise: torch.Tensor,
                labels: torch.Tensor, guidance: Guidance, generators: Sequence[torch.Generator],
                prediction: str = "epsilon", clip_x0: bool = False,
                progress: Optional[Progress] = None) -> torch.Tensor:
    """Ancestral sampling over all T steps (Ho et al. 2020, alg. 2) with the posterior
    q(x_{t-1} | x_t, x0_hat) of eq. 6-7 and the 'fixed small' variance beta_tilde_t."""
    _check_inputs(schedule, noise, labels, generators, needs_generators=True)
    x = noise.float()
    all_t = torch.arange(schedule.num_timesteps - 1, -1, -1)
    for t, t_prev, a_t, a_prev in _steps(schedule, all_t, x.device, progress):
        out = guided_output(model, x, t, labels, guidance).float()
        x0, _ = split_prediction(prediction, out, x, a_t)
        x0 = x0.clamp(-1, 1) if clip_x0 else x0
        alpha_t, beta_t = a_t / a_prev, 1 - a_t / a_prev
        # eq. 7: mu_tilde = sqrt(a_prev) beta_t / (1-a_t) x0 + sqrt(alpha_t) (1-a_prev) / (1-a_t) x_t
        mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + (alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)  # beta_tilde_t
            mean = mean + var.sqrt() * per_sample_randn(generators, x.shape[1:], x.device)
        x = mean
    return x


def ddim_sample(model: Denoiser, schedule: NoiseSchedule, timesteps: torch.Tensor,
                noise: torch.Tensor, labels: torch.Tensor, guidance: Guidance,
                eta: float = 0.0, generators: Optional[Sequence[torch.Generator]] = None,
                prediction: str = "epsilon", clip_x0: bool = False,
                progress: Optional[Progress] = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): eta 0 is deterministic, eta 1 matches DDPM's variance."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta={eta} must be in [0, 1]")
    _check_inputs(schedule, noise, labels, generators, needs_generators=eta > 0)
    x = noise.float()
    for t, t_prev, a_t, a_prev in _steps(schedule, timesteps, x.device, progress):
        out = guided_output(model, x, t, labels, guidance).float()
        x0, eps = split_prediction(prediction, out, x, a_t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # keep eps consistent with clipped x0
        # eq. 16: sigma_t = eta sqrt((1-a_prev)/(1-a_t)) sqrt(1 - a_t/a_prev)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        # eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
        if eta > 0:
            x = x + sigma * per_sample_randn(generators, x.shape[1:], x.device)
    return x


def dpm_solver_2m_sample(model: Denoiser, schedule: NoiseSchedule, timesteps: torch.Tensor,
                         noise: torch.Tensor, labels: torch.Tensor, guidance: Guidance,
                         prediction: str = "epsilon", clip_x0: bool = False,
                         progress: Optional[Progress] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2), data-prediction multistep solver in
    lambda = log(alpha/sigma). First-order on the first step and the final step to the
    clean image (where sigma = 0), second-order (midpoint form) in between."""
    _check_inputs(schedule, noise, labels, None, needs_generators=False)
    x, prev = noise.float(), None  # prev: (x0_hat, lambda) of the previous step
    for t, t_prev, a_t, a_next in _steps(schedule, timesteps, x.device, progress):
        out = guided_output(model, x, t, labels, guidance).float()
        alpha_s, sigma_s = _alpha_sigma(a_t)
        x0, _ = split_prediction(prediction, out, x, alpha_s ** 2)
        x0 = x0.clamp(-1, 1) if clip_x0 else x0
        if t_prev < 0:  # sigma_next = 0: the ODE solution is the data prediction itself
            return x0
        alpha_n, sigma_n = _alpha_sigma(a_next)
        lam_s, h = _lambda(alpha_s, sigma_s), _lambda(alpha_n, sigma_n) - _lambda(alpha_s, sigma_s)
        d = x0 if prev is None else x0 + 0.5 * (x0 - prev[0]) * h / (lam_s - prev[1])
        # x_next = (sigma_n / sigma_s) x - alpha_n (e^{-h} - 1) D   (eq. 3.10 / alg. 2)
        x = (sigma_n / sigma_s) * x - alpha_n * (torch.exp(-h) - 1.0) * d
        prev = (x0, lam_s)
    return x


def _alpha_sigma(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of x_t = alpha x0 + sigma eps, via the VE noise level
    s = sqrt((1 - alpha_bar) / alpha_bar): alpha = 1 / sqrt(1 + s^2), sigma = s alpha.
    Going through s (as diffusers does) keeps alpha accurate where alpha_bar is tiny."""
    s = ((1 - alpha_bar) / alpha_bar).sqrt()
    alpha = 1.0 / (s ** 2 + 1).sqrt()
    return alpha, s * alpha


def _lambda(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR, lambda = log(alpha / sigma)."""
    return torch.log(alpha) - torch.log(sigma)


def unipc_sample(model: Denoiser, schedule: NoiseSchedule, timesteps: torch.Tensor,
                 noise: torch.Tensor, labels: torch.Tensor, guidance: Guidance, order: int = 2,
                 prediction: str = "epsilon", clip_x0: bool = False,
                 progress: Optional[Progress] = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), bh2 variant (B(h) = e^h - 1), data prediction, as diffusers'
    UniPCMultistepScheduler: a predictor of up to ``order`` (lower while the history fills
    and over the last steps), then at the new point a corrector that reuses the model
    output made there, so it costs no extra evaluation. The last step returns the data
    prediction (sigma = 0)."""
    _check_inputs(schedule, noise, labels, None, needs_generators=False)
    x, history = noise.float(), []  # history: (x0_hat, lambda, sigma) per point, newest last
    last_x, last_order, n = None, 0, len(timesteps)
    for i, (t, t_prev, a_t, a_next) in enumerate(_steps(schedule, timesteps, x.device, progress)):
        out = guided_output(model, x, t, labels, guidance).float()
        alpha_s, sigma_s = _alpha_sigma(a_t)
        x0, _ = split_prediction(prediction, out, x, alpha_s ** 2)
        x0 = x0.clamp(-1, 1) if clip_x0 else x0
        if t_prev < 0:  # the step to sigma = 0 lands on the data prediction, corrected or not
            return x0
        lam_s = _lambda(alpha_s, sigma_s)
        if last_x is not None:  # corrector: from the last point to here, with this output
            x = _unipc_update(last_x, history[-last_order:], lam_s, alpha_s, sigma_s, corrector_x0=x0)
        history = (history + [(x0, lam_s, sigma_s)])[-order:]
        last_x, last_order = x, min(order, len(history), n - i)
        alpha_n, sigma_n = _alpha_sigma(a_next)
        x = _unipc_update(x, history[-last_order:], _lambda(alpha_n, sigma_n), alpha_n, sigma_n)
    return x


def _unipc_update(x: torch.Tensor, history: list, lam_t: torch.Tensor, alpha_t: torch.Tensor,
                  sigma_t: torch.Tensor, corrector_x0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One UniPC-bh2 step from the newest point of ``history`` (order = its length) to
    lambda_t: the predictor, or with ``corrector_x0`` (the data prediction made at t) the
    corrector."""
    order = len(history)
    m0, lam_s, sigma_s = history[-1]
    h = lam_t - lam_s
    rks = [(history[-1 - k][1] - lam_s) / h for k in range(1, order)]
    d1s = [(history[-1 - k][0] - m0) / rk for k, rk in zip(range(1, order), rks)]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = h_phi_1  # bh2
    r, b = _unipc_system(torch.stack(rks + [torch.ones_like(h)]), hh, h_phi_1, b_h, order)
    x_next = (sigma_t / sigma_s) * x - alpha_t * h_phi_1 * m0
    if corrector_x0 is None:
        if order == 1:
            return x_next
        rhos = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(r[:-1, :-1], b[:-1])
        return x_next - alpha_t * b_h * sum(rho * d for rho, d in zip(rhos, d1s))
    rhos = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(r, b)
    residual = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) + rhos[-1] * (corrector_x0 - m0)
    return x_next - alpha_t * b_h * residual


def _unipc_system(rks: torch.Tensor, hh: torch.Tensor, h_phi_1: torch.Tensor, b_h: torch.Tensor,
                  order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """R (powers of the step ratios) and b (the phi-function terms over B(h)) whose solve
    gives UniPC's weights (the paper's eq. 9 / alg. 2)."""
    rows, rhs, phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        rhs.append(phi_k * factorial / b_h)
        factorial *= i + 1
        phi_k = phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.stack(rhs)


# A registered sampler: (model, process, noise, labels, guidance, the config's sample section,
# per-sample generators, progress=None) -> samples. It reads from ``sample`` what it uses.
Sampler = Callable[..., torch.Tensor]


def sampler(name: str) -> Sampler:
    """The sampler registered as ``name`` (sample.sampler)."""
    return implementation(REGISTERED[name].implementation)


def ddpm(model, process, noise, labels, guidance, sample, generators, progress=None):
    return ddpm_sample(model, process.schedule, noise, labels, guidance, generators,
                       prediction=process.prediction, clip_x0=sample.clip_x0, progress=progress)


def ddim(model, process, noise, labels, guidance, sample, generators, progress=None):
    return ddim_sample(model, process.schedule, _grid(process, sample), noise, labels, guidance,
                       eta=sample.eta, generators=generators, prediction=process.prediction,
                       clip_x0=sample.clip_x0, progress=progress)


def dpm_solver_2m(model, process, noise, labels, guidance, sample, generators, progress=None):
    return dpm_solver_2m_sample(model, process.schedule, _grid(process, sample), noise, labels,
                                guidance, prediction=process.prediction, clip_x0=sample.clip_x0, progress=progress)


def unipc(model, process, noise, labels, guidance, sample, generators, progress=None):
    return unipc_sample(model, process.schedule, _grid(process, sample), noise, labels, guidance,
                        order=sample.order, prediction=process.prediction, clip_x0=sample.clip_x0,
                        progress=progress)


def _grid(process: VariancePreserving, sample) -> torch.Tensor:
    """The timesteps of ``sample.sampler`` (a multistep solver's grid has steps + 1 points)."""
    return process.timesteps(sample.steps, sample.spacing, multistep=sample.sampler in MULTISTEP)


def run_sampler(name: str, model: Denoiser, schedule: NoiseSchedule, noise: torch.Tensor,
                labels: torch.Tensor, guidance: Guidance, *, steps: int = 50,
                spacing: str = "leading", eta: float = 0.0,
                generators: Optional[Sequence[torch.Generator]] = None,
                prediction: str = "epsilon", clip_x0: bool = False, order: int = 2,
                progress: Optional[Progress] = None) -> torch.Tensor:
    """A sampler of the ddpm process on an explicit schedule, called as generate calls it;
    bad names and step counts fail before any model call. ``order``: UniPC's order (1 to 3)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} for the ddpm process; choose one of {list(SAMPLERS)}")
    sample = SampleConfig(sampler=name, steps=steps, spacing=spacing, eta=eta, clip_x0=clip_x0, order=order)
    process = VariancePreserving.of_schedule(schedule, prediction)
    return sampler(name)(model, process, noise, labels, guidance, sample, generators, progress=progress)
