"""The sample order: seeded per-epoch shuffle, a disjoint slice per rank, and a position that resumes exactly.

Every rank computes the same permutation of all ``N`` samples for epoch ``e`` (seeded by ``(seed, e)``) and takes
``perm[rank::world_size]``: the ranks' slices are disjoint and together cover the epoch (sizes differ by at most one,
which an endless stream absorbs). The position is ``(epoch, cursor)`` into that slice. Every other random choice (the
clip's start frame) is a pure function of ``(seed, epoch, index)``, so the position *is* the whole RNG state: resuming
from it replays exactly the same stream, whichever decoder runs and however far the prefetcher had read ahead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np


@dataclass(frozen=True)
class Position:
    """Where the stream stands: the next sample is ``slice(epoch)[cursor]``."""

    epoch: int = 0
    cursor: int = 0


@dataclass(frozen=True)
class StreamItem:
    epoch: int
    index: int  # sample index (manifest row)
    after: Position  # the position once this item is consumed
    last_of_epoch: bool


class ShardedOrder:
    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot give each of {world_size} ranks at least one")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch``, in order."""
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            perm = np.arange(self.num_samples)
        return perm[self.rank :: self.world_size]

    def clip_fraction(self, epoch: int, index: int) -> float:
        """Where in its video the clip of ``index`` starts this epoch, in [0, 1): seeded, rank-independent."""
        return float(np.random.default_rng([self.seed, epoch, index, 1]).random())

    def items(self, start: Position, num_epochs: Optional[int] = None) -> Iterator[StreamItem]:
        """The stream from ``start``: endless, or up to the end of epoch ``num_epochs - 1``."""
        epoch, cursor = start.epoch, start.cursor
        while num_epochs is None or epoch < num_epochs:
            idx = self.epoch_indices(epoch)
            for c in range(cursor, len(idx)):
                last = c == len(idx) - 1
                after = Position(epoch + 1, 0) if last else Position(epoch, c + 1)
                yield StreamItem(epoch, int(idx[c]), after, last)
            epoch, cursor = epoch + 1, 0

    def state(self, pos: Position) -> dict[str, Any]:
        return {
            **asdict(pos),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def position_from(self, state: dict[str, Any]) -> Position:
        """The saved position, after checking it belongs to this stream (same data, seed and sharding)."""
        for key in ("seed", "rank", "world_size", "num_samples", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"data state was saved with {key}={state[key]!r} but this reader has {key}={getattr(self, key)!r};"
                    " resuming would replay a different stream"
                )
        return Position(int(state["epoch"]), int(state["cursor"]))
