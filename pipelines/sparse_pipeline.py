"""``SparsePipeline``: a diffusers pipeline with sparse attention, its dense baseline a context away."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dit_sparse.config import SparseAttentionConfig
from dit_sparse.controller import SparseAttentionController
from dit_sparse.stats import SparseRunStats

from .hooks import apply_sparse_attention, remove_sparse_attention


class SparsePipeline:
    """A pipeline whose transformers run block-sparse self-attention; call it like the pipeline.

    Args:
        pipe: a diffusers pipeline built on a supported transformer.
        config: the sparse attention configuration (default: ``SparseAttentionConfig()``).

    Attributes:
        pipe: the wrapped pipeline (sparse attention stays applied until :meth:`remove`).
        config: the configuration.
        controller: the shared :class:`~dit_sparse.controller.SparseAttentionController`.
        last_stats: :class:`~dit_sparse.stats.SparseRunStats` of the latest call (``None`` before
            the first): wall time, dense/sparse calls per step and transformer/context, every
            calibration's per-head family, recall and density, calibration time.

    Example::

        >>> sp = SparsePipeline(pipe, SparseAttentionConfig(pattern="auto", density=0.15))  # doctest: +SKIP
        >>> video = sp(prompt="a cat surfing", num_frames=81).frames[0]  # doctest: +SKIP
        >>> sp.last_stats.wall_seconds, sp.last_stats.mean_sparse_density  # doctest: +SKIP
        >>> with sp.dense():  # doctest: +SKIP
        ...     reference = sp(prompt="a cat surfing", num_frames=81).frames[0]
        >>> sp.save_plans("plans.safetensors")  # doctest: +SKIP
    """

    def __init__(self, pipe: Any, config: SparseAttentionConfig | None = None) -> None:
        self.pipe = pipe
        self.config = config if config is not None else SparseAttentionConfig()
        self.controller: SparseAttentionController = apply_sparse_attention(pipe, self.config)
        self.last_stats: SparseRunStats | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the pipeline; returns its output and fills :attr:`last_stats`."""
        generation = self.controller.generation
        start = time.perf_counter()
        try:
            output = self.pipe(*args, **kwargs)
        finally:  # a failed or interrupted call must not leave its steps to the next one
            self.controller.finish_generation()
        wall_seconds = time.perf_counter() - start
        ran = self.controller.generation != generation and self.controller.last_stats is not None
        self.last_stats = self.controller.last_stats if ran else SparseRunStats()
        self.last_stats.wall_seconds = wall_seconds
        return output

    @contextmanager
    def dense(self) -> Iterator[SparsePipeline]:
        """Within this context every self-attention call runs the stock dense path (bit-exact with
        the unwrapped pipeline): the baseline, on the same pipeline."""
        previous = self.controller.force_dense
        self.controller.force_dense = True
        try:
            yield self
        finally:
            self.controller.force_dense = previous

    def save_plans(self, path: str | Path) -> None:
        """Save the cached plans (safetensors + JSON metadata naming model, layouts and config)."""
        self.controller.save_plans(path)

    def load_plans(self, path: str | Path) -> int:
        """Load saved plans; they skip calibration. Returns how many. A file for another model or
        config is refused with a message naming what differs."""
        return self.controller.load_plans(path)

    def clear_plans(self) -> None:
        """Forget every cached and loaded plan."""
        self.controller.clear_plans()

    def remove(self) -> Any:
        """Restore the stock processors and return the plain pipeline."""
        remove_sparse_attention(self.pipe)
        return self.pipe
