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
from .distributed import all_gather_flat


class EngineEMA:
    def __init__(self, engine, zero_stage: int):
        self.engine, self.sharded = engine, zero_stage == 3
        named = list(engine.module.named_parameters())
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        current = self._current()
        self.flat = _flatten(current).float().clone()
        self.shadow = _views(self.flat, current)

    def _current(self) -> list[torch.Tensor]:
        if self.sharded:
            from deepspeed.utils import safe_get_local_fp32_param
            return [safe_get_local_fp32_param(p) for p in self.params]
        return [p.detach() for p in self.params]

    def update(self, decay: float) -> None:
        ema_update_([self.flat], [_flatten(self._current())], decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's EMA tensors (partitions under ZeRO-3), for its checkpoint shard
        (copies: safetensors refuses views that share one buffer)."""
        return {n: t.clone() for n, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks {len(missing)} parameters (e.g. {missing[0]}); "
                             f"it was saved from a different model")
        for name, shadow in zip(self.names, self.shadow):
            if state[name].shape != shadow.shape:
                raise ValueError(f"EMA tensor {name} has shape {tuple(state[name].shape)} in the checkpoint "
                                 f"but {tuple(shadow.shape)} here; the model config or world size changed")
            shadow.copy_(state[name])

    def load_resharded(self, old_shards: list[dict[str, torch.Tensor]], rank: int, world_size: int) -> None:
        """Load an EMA saved by another number of ranks: full copies (ZeRO 0-2) or
        partitions (ZeRO-3), cut again for this rank when this run is sharded."""
        full = {}
        for name, p in zip(self.names, self.params):
            full[name] = join_partitions([s[name] for s in old_shards], p.ds_shape if self.sharded else p.shape)
        if not self.sharded:
            self.load_state_dict(full)
            return
        for name, shadow in zip(self.names, self.shadow):
            flat, size = full[name].flatten(), shadow.numel()
            padded = torch.cat([flat, flat.new_zeros(size * world_size - flat.numel())])
            shadow.copy_(padded[rank * size:(rank + 1) * size])

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole EMA as a state dict (a collective under ZeRO-3: every rank calls it)."""
        if not self.sharded:
            return dict(zip(self.names, (t.clone() for t in self.shadow)))
        return {n: all_gather_flat(t.flatten())[: p.ds_numel].view(p.ds_shape).clone()
                for n, t, p in zip(self.names, self.shadow, self.params)}


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
