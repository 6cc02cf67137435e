"""The demo's dense baselines, kept per dense-relevant settings so that changing only the sparse knobs
reruns only the sparse side.

Only finished baselines go in (a failed generation never does); the oldest is dropped, its video
file deleted, once more than ``capacity`` are held.

Example::

    >>> cache = DenseCache(capacity=2)
    >>> key = DenseKey("a red fox", GenerationSettings(steps=4, frames=9, height=32, width=32))
    >>> cache.get(key) is None
    True
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dit_sparse.eval.harness.models import GenerationSettings


@dataclass(frozen=True)
class DenseKey:
    """What the dense output depends on: the prompt and the resolved generation settings (seed,
    frames, size, steps, guidance)."""

    prompt: str
    settings: GenerationSettings


@dataclass(frozen=True)
class DenseRun:
    """A dense generation: its raw frames, wall time and mp4."""

    frames: np.ndarray
    wall_seconds: float
    video: Path


class DenseCache:
    """The latest ``capacity`` dense runs by :class:`DenseKey`, least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the dense cache needs room for at least one run, got capacity={capacity}")
        self.capacity = capacity
        self._runs: OrderedDict[DenseKey, DenseRun] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, key: DenseKey) -> DenseRun | None:
        """The run for ``key`` (now the most recently used), or ``None``."""
        run = self._runs.get(key)
        if run is not None:
            self._runs.move_to_end(key)
        return run

    def put(self, key: DenseKey, run: DenseRun) -> None:
        """Keep ``run`` for ``key``; drop the least recently used runs beyond ``capacity``."""
        self._runs[key] = run
        self._runs.move_to_end(key)
        while len(self._runs) > self.capacity:
            _, dropped = self._runs.popitem(last=False)
            dropped.video.unlink(missing_ok=True)
