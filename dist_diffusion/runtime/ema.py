"""EMA of the weights, kept where the weights live.

ZeRO-3: each rank keeps the EMA of its own fp32 master partition (the optimizer's copy;
a bf16 partition is too coarse for decays near 1), so EMA memory per rank is ~1/world
of the model and no step gathers anything. ZeRO 0-2: a full fp32 copy per rank, tracking
the module's weights. The math is ``core.ema``; this file only picks the tensors.

The EMA lives in one flat fp32 buffer (the per-parameter tensors are views into it), so
an update is one concatenation, one cast and one lerp instead of a few hundred small
kernels per step.
"""

from __future__ import annotations

import math

import torch

from ..core.ema import ema_update_
from ..core.posthoc_ema import gamma_from_sigma_rel, power_ema_update_
from .checkpoint import profile_key
from .distributed import all_gather_flat


class EngineEMA:
    """The EMA of decay ``ema_decay(...)`` and, with ``sigma_rels``, post-hoc EMA's
    power-function profiles (core.posthoc_ema), each one flat fp32 buffer of the same
    tensors; every one is one lerp per step."""

    def __init__(self, engine, zero_stage: int, sigma_rels: tuple[float, ...] = ()):
        self.engine, self.sharded = engine, zero_stage == 3
        named = list(engine.module.named_parameters())
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        current = self._current()
        self.flat = _flatten(current).float().clone()
        self.shadow = _views(self.flat, current)
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = tuple(gamma_from_sigma_rel(s) for s in self.sigma_rels)
        self.profiles = [self.flat.clone() for _ in self.sigma_rels]  # overwritten at step 1 (beta_1 = 0)

    def _current(self) -> list[torch.Tensor]:
        if self.sharded:
            from deepspeed.utils import safe_get_local_fp32_param
            return [safe_get_local_fp32_param(p) for p in self.params]
        return [p.detach() for p in self.params]

    def update(self, decay: float, step: int = 0) -> None:
        """After optimizer step ``step`` (1-based; the profiles' clock)."""
        current = _flatten(self._current())
        ema_update_([self.flat], [current], decay)
        for profile, gamma in zip(self.profiles, self.gammas):
            power_ema_update_(profile, current, step, gamma)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's EMA tensors (partitions under ZeRO-3), for its checkpoint shard
        (copies: safetensors refuses views that share one buffer)."""
        return {n: t.clone() for n, t in zip(self.names, self.shadow)}

    def profiles_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's profiles, as ``<profile_key(sigma_rel)>/<parameter>`` (empty: none tracked)."""
        return {f"{profile_key(s)}/{n}": t.clone() for s, flat in zip(self.sigma_rels, self.profiles)
                for n, t in zip(self.names, _views(flat, self.shadow))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _copy_into(self.names, self.shadow, state, "EMA")

    def load_profiles(self, state: dict[str, torch.Tensor]) -> None:
        for sigma, flat in zip(self.sigma_rels, self.profiles):
            key = profile_key(sigma)
            _copy_into(self.names, _views(flat, self.shadow), {n[len(key) + 1:]: t for n, t in state.items()
                                                               if n.startswith(key + "/")}, f"profile {key}")

    def load_resharded(self, old_shards: list[dict[str, torch.Tensor]], rank: int, world_size: int,
                       prefix: str = "") -> None:
        """Load an EMA (or with ``prefix``, a profile's ``prefix/`` tensors) saved by another
        number of ranks: full copies (ZeRO 0-2) or partitions (ZeRO-3), cut again for this
        rank when this run is sharded."""
        target = self.shadow if not prefix else _views(self.profiles[self._profile_index(prefix)], self.shadow)
        key = f"{prefix}/" if prefix else ""
        full = {}
        for name, p in zip(self.names, self.params):
            full[name] = join_partitions([s[key + name] for s in old_shards], p.ds_shape if self.sharded else p.shape)
        if not self.sharded:
            _copy_into(self.names, target, full, prefix or "EMA")
            return
        for name, shadow in zip(self.names, target):
            flat, size = full[name].flatten(), shadow.numel()
            padded = torch.cat([flat, flat.new_zeros(size * world_size - flat.numel())])
            shadow.copy_(padded[rank * size:(rank + 1) * size])

    def _profile_index(self, key: str) -> int:
        return [profile_key(s) for s in self.sigma_rels].index(key)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole EMA as a state dict (a collective under ZeRO-3: every rank calls it)."""
        if not self.sharded:
            return dict(zip(self.names, (t.clone() for t in self.shadow)))
        return {n: all_gather_flat(t.flatten())[: p.ds_numel].view(p.ds_shape).clone()
                for n, t, p in zip(self.names, self.shadow, self.params)}


def _copy_into(names: list[str], targets: list[torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"the checkpoint's {what} lacks {len(missing)} parameters (e.g. {missing[0]}); "
                         f"it was saved from a different model")
    for name, target in zip(names, targets):
        if state[name].shape != target.shape:
            raise ValueError(f"{what} tensor {name} has shape {tuple(state[name].shape)} in the checkpoint "
                             f"but {tuple(target.shape)} here; the model config or world size changed")
        target.copy_(state[name])


def join_partitions(parts: list[torch.Tensor], shape) -> torch.Tensor:
    """One parameter from the ranks' checkpoint tensors: a full copy (ZeRO 0-2, every rank
    holds the whole tensor) or ZeRO-3's N equal, padded pieces of the flat parameter."""
    numel = math.prod(shape)
    if parts[0].numel() == numel:
        return parts[0].reshape(shape)
    return torch.cat([t.flatten() for t in parts])[:numel].view(shape)


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """One view of ``flat`` per tensor of ``like``, in order (single-output slices: the
    multi-output views of split() may not see their base change in place)."""
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views
