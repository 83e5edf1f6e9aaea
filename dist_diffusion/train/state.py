"""What a checkpoint carries beyond the engine and the EMA: the step, the data position and
the count of skipped steps, as one typed ``TrainState`` that writes and reads itself.

Each rank saves its own state (its data position is its own); an elastic resume reads every
old rank's and merges their positions for the new world size."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.stream import Position, StreamSpec, unconsumed
from ..runtime import checkpoint
from ..runtime.distributed import any_rank

# The stream settings a position is relative to: what an elastic resume needs to replay
# each old rank's share of the epoch.
STREAM_KEYS = ("batch_size", "world_size", "num_workers", "seed")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    position: Position = field(default_factory=Position)  # micro-batches the loop consumed
    skipped_steps: int = 0  # steps dropped for a non-finite loss (train.nan_policy=skip)

    def to_dict(self, spec: StreamSpec) -> dict:
        return {"step": self.step, "position": self.position.state_dict(), "skipped_steps": self.skipped_steps,
                "stream": {k: getattr(spec, k) for k in STREAM_KEYS}}

    @classmethod
    def from_dicts(cls, states: list[dict], spec: StreamSpec, manifest: dict, elastic: bool) -> TrainState:
        """This rank's state, from its own saved state, or (``elastic``: the checkpoint was
        written by another number of processes) from every old rank's."""
        first = states[0]
        position = _merge_positions(states, spec, manifest) if elastic else Position(**first["position"])
        return cls(first["step"], position, first["skipped_steps"])

    def save(self, engine, ema, root: Path, spec: StreamSpec, keep_last: int, meta: dict, writer=None) -> Path:
        """The checkpoint folder of this step (every rank calls it): complete when it returns,
        or, with a background ``writer``, once the loop marks it so."""
        return checkpoint.save(engine, ema, root, self.step, self.to_dict(spec), keep_last, meta, writer)

    @classmethod
    def restore(cls, engine, ema, root: Path, tag: str, spec: StreamSpec, manifest: dict,
                elastic: bool) -> tuple[TrainState, int]:
        """Engine, EMA and state from checkpoint ``tag``; also how many processes wrote it."""
        states = checkpoint.load(engine, ema, root, tag, spec.world_size)
        return cls.from_dicts(states, spec, manifest, elastic), len(states)


def _merge_positions(states: list[dict], spec: StreamSpec, manifest: dict) -> Position:
    """After a world-size change: this epoch continues over what every old rank had left,
    in rank order, split afresh over the new ranks; later epochs are whole again."""
    left = []
    for rank, state in enumerate(states):
        old = StreamSpec(**{**state["stream"], "url": spec.url, "rank": rank})
        left += unconsumed(manifest, old, Position(**state["position"]))
    return Position(epoch=states[0]["position"]["epoch"], batches=0, remaining=left)


def find_resume_tag(run_dir: Path, ckpt_url: str, local_rank: int) -> str | None:
    """The newest complete checkpoint of the run directory, else of ``train.ckpt_url``.

    Whether to download is decided by all ranks together: download_latest ends in a
    barrier, and a rank that looked after local rank 0 had finished downloading would
    otherwise skip it and leave the others waiting there (seen as a hang under load)."""
    root = Path(run_dir) / "checkpoints"
    tag = checkpoint.latest_complete(root)
    if ckpt_url and any_rank(tag is None):
        tag = checkpoint.download_latest(ckpt_url, root, local_rank)
    return tag
