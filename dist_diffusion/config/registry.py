"""The forward processes and samplers, by name: the one place their names are written. The
config takes its choices for ``diffusion.process`` and ``sample.sampler`` from here, and
checks a recipe against each entry's rules; core finds each implementation by the path its
entry gives (imported on first use, so validating a config never imports torch).

Adding a process is its class (a core.processes.ForwardProcess) and one :class:`Process`
entry; adding a sampler is its function (core.samplers.Sampler's signature) and one
:class:`Sampler` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple


@dataclass(frozen=True)
class Process:
    """A forward process: ``diffusion.process`` NAME."""

    name: str
    implementation: str  # "module:Class" under dist_diffusion, built from the diffusion section
    doc: str
    # the diffusion section's problems under this process (one line each, naming the fix)
    rules: Callable[[object], List[str]] = field(default=lambda diffusion: [])


@dataclass(frozen=True)
class Sampler:
    """A sampler: ``sample.sampler`` NAME, which integrates one process."""

    name: str
    process: str
    implementation: str  # "module:function" under dist_diffusion, core.samplers.Sampler's signature
    doc: str
    multistep: bool = False  # lays its grid over steps + 1 timesteps: at most T - 1 steps
    all_steps: bool = False  # walks every one of the T training timesteps, whatever sample.steps says
    evaluations: Callable[[int], int] = field(default=lambda steps: steps)  # network evaluations per sample

    def most_steps(self, num_train_timesteps: int) -> int:
        return num_train_timesteps - int(self.multistep)

    def network_evaluations(self, steps: int, num_train_timesteps: int) -> int:
        """NFE per sample (a CFG step's conditional and unconditional halves are one batched
        evaluation)."""
        return self.evaluations(num_train_timesteps if self.all_steps else steps)


def _by_name(*entries) -> Dict[str, object]:
    return {entry.name: entry for entry in entries}


def _ddpm_rules(d) -> List[str]:
    if d.time_distribution != "uniform":
        return [f"diffusion.time_distribution={d.time_distribution} draws rectified_flow's continuous t; the ddpm "
                f"process trains on uniform integer timesteps: leave it uniform"]
    return []


def _flow_rules(d) -> List[str]:
    """The ddpm process's keys mean nothing on rectified flow's straight path: one line each."""
    problems = []
    if d.prediction != "v":
        problems.append(f"diffusion.process=rectified_flow learns the velocity eps - x0: set diffusion.prediction=v "
                        f"(not {d.prediction})")
    ddpm_only = {"diffusion.snr_shift": (d.snr_shift, 1.0), "diffusion.schedule": (d.schedule, "linear"),
                 "diffusion.beta_start": (d.beta_start, None), "diffusion.beta_end": (d.beta_end, None),
                 "diffusion.min_snr_gamma": (d.min_snr_gamma, 0.0)}
    for key, (value, default) in ddpm_only.items():
        if value != default:
            problems.append(f"{key}={value} shapes the ddpm process's noise schedule or loss, which "
                            f"diffusion.process=rectified_flow does not have: leave it at {default}")
    return problems


PROCESSES: Dict[str, Process] = _by_name(
    Process("ddpm", "core.processes:VariancePreserving",
            "DDPM's variance-preserving process: integer t in 0..T-1 under diffusion.schedule, the UNet "
            "predicting epsilon or v", _ddpm_rules),
    Process("rectified_flow", "core.flow:RectifiedFlow",
            "rectified flow (SD3): x_t = (1 - t) x0 + t eps for t in [0, 1], the UNet predicting the velocity "
            "eps - x0 (prediction=v); sampled by flow_euler or flow_heun", _flow_rules),
)

SAMPLERS: Dict[str, Sampler] = _by_name(
    Sampler("ddpm", "ddpm", "core.samplers:ddpm", "ancestral sampling over all T steps", all_steps=True),
    Sampler("ddim", "ddpm", "core.samplers:ddim", "DDIM (sample.eta 0: deterministic)"),
    Sampler("dpm_solver_2m", "ddpm", "core.samplers:dpm_solver_2m", "DPM-Solver++(2M)", multistep=True),
    # UniPC's corrector reuses the next step's evaluation: one per step
    Sampler("unipc", "ddpm", "core.samplers:unipc", "UniPC-bh2", multistep=True),
    Sampler("flow_euler", "rectified_flow", "core.flow:euler", "Euler steps along rectified flow's ODE"),
    # Heun's last step, to t = 0, is an Euler step: 2 evaluations a step but the last
    Sampler("flow_heun", "rectified_flow", "core.flow:heun", "Heun steps along rectified flow's ODE",
            evaluations=lambda steps: 2 * steps - 1),
)


def samplers_of(process: str) -> Tuple[str, ...]:
    """The samplers that integrate ``process``."""
    return tuple(name for name, entry in SAMPLERS.items() if entry.process == process)


def choices_doc(entries: Dict[str, object]) -> str:
    """'name: doc; ...' for a config field's documentation."""
    return "; ".join(f"{name}: {entry.doc}" for name, entry in entries.items())
