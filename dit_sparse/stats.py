"""What one generation did: per step and transformer/context, how many self-attention calls ran
dense or sparse and how many plans they built; per calibration, the plan chosen (family, recall and
density per head)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StepStats:
    """Self-attention calls of one transformer and CFG context at one step.

    Attributes:
        step: the pipeline's step index (``i`` of ``callback_on_step_end``).
        transformer: ``"transformer"`` or ``"transformer_2"``.
        context: the CFG context (``"cond"``, ``"uncond"``, ``"cond_uncond"`` for batched CFG, or
            ``"default"`` outside any cache context).
        dense, sparse: self-attention calls that ran dense and sparse.
        calibrations: plans built from these calls (at the last dense step, a recalibration step,
            or a sparse step that found no plan).
        sparse_density: mean density of the sparse calls (``None`` without any).
        rank_flops: attention FLOPs of these calls (``4 * B * S**2 * D`` per head, times the density
            a sparse call keeps) on each Ulysses rank, in rank order; one entry without context
            parallelism. Ranks differ when heads left dense gather on some of them.
    """

    step: int
    transformer: str
    context: str
    dense: int = 0
    sparse: int = 0
    calibrations: int = 0
    rank_flops: list[float] = field(default_factory=list)
    _density_sum: float = field(default=0.0, repr=False)

    @property
    def sparse_density(self) -> float | None:
        return self._density_sum / self.sparse if self.sparse else None

    def add_sparse(self, density: float) -> None:
        self.sparse += 1
        self._density_sum += density

    def add_flops(self, per_rank: list[float]) -> None:
        self.rank_flops = [a + b for a, b in zip(self.rank_flops, per_rank)] if self.rank_flops else list(per_rank)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "transformer": self.transformer, "context": self.context, "dense": self.dense,
                "sparse": self.sparse, "calibrations": self.calibrations, "sparse_density": self.sparse_density,
                "rank_flops": self.rank_flops}


@dataclass
class PlanStats:
    """One calibration: the plan a layer got.

    Attributes:
        transformer, layer, context, step: where and when it was calibrated.
        grid, text_len: the layout it serves.
        family: ``[B][H]`` family chosen per batch element and head.
        recall: ``[B][H]`` share of the measured attention mass kept.
        density: ``[B][H]`` fraction of the attention FLOPs kept.
        seconds: calibration and planning time.
        error: ``[B][H]`` estimated relative output error on sampled query rows (``None`` unless
            ``pattern="auto"`` chose by error).
    """

    transformer: str
    layer: int
    context: str
    step: int
    grid: tuple[int, int, int]
    text_len: int
    family: list[list[str]]
    recall: list[list[float]]
    density: list[list[float]]
    seconds: float
    error: list[list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PlanCheck:
    """One per-step check of a cached plan (``SparseAttentionConfig(recalibrate_error=...)``).

    Attributes:
        transformer, layer, context, step: where and when the plan was checked.
        plan_step: the step that calibrated the plan checked (``None`` for a loaded plan).
        error: ``[B][H]`` its estimated relative output error on this step's sampled query rows.
        mean_error: ``error`` averaged over the layer's heads (what the bound is compared with).
        recalibrated: whether the layer was planned again at this step.
    """

    transformer: str
    layer: int
    context: str
    step: int
    plan_step: int | None
    error: list[list[float]]
    mean_error: float
    recalibrated: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SparseRunStats:
    """Statistics of one pipeline call (one generation).

    Attributes:
        steps: :class:`StepStats` in call order.
        plans: :class:`PlanStats` of every calibration, in order.
        checks: :class:`PlanCheck` of every per-step plan check, in order.
        wall_seconds: wall time of the whole pipeline call (set by ``SparsePipeline``; ``None`` when
            the hooks were applied directly).

    Example::

        >>> stats = SparseRunStats()
        >>> stats.step_stats(0, "transformer", "cond").dense += 40
        >>> stats.step_stats(1, "transformer", "cond").add_sparse(0.25)
        >>> stats.attention_calls, stats.sparse_calls, stats.mean_sparse_density
        (41, 1, 0.25)
    """

    steps: list[StepStats] = field(default_factory=list)
    plans: list[PlanStats] = field(default_factory=list)
    checks: list[PlanCheck] = field(default_factory=list)
    wall_seconds: float | None = None
    _index: dict[tuple[int, str, str], StepStats] = field(default_factory=dict, repr=False)

    def step_stats(self, step: int, transformer: str, context: str) -> StepStats:
        """The record of ``(step, transformer, context)``, created on first use."""
        key = (step, transformer, context)
        record = self._index.get(key)
        if record is None:
            record = self._index[key] = StepStats(step, transformer, context)
            self.steps.append(record)
        return record

    @property
    def attention_calls(self) -> int:
        return sum(s.dense + s.sparse for s in self.steps)

    @property
    def sparse_calls(self) -> int:
        return sum(s.sparse for s in self.steps)

    @property
    def calibrations(self) -> int:
        return len(self.plans)

    @property
    def calibration_seconds(self) -> float:
        return sum(p.seconds for p in self.plans)

    @property
    def rank_attention_flops(self) -> list[float]:
        """Self-attention FLOPs of the whole generation on each Ulysses rank (one entry without
        context parallelism): the load balance across ranks."""
        totals: list[float] = []
        for s in self.steps:
            totals = [a + b for a, b in zip(totals, s.rank_flops)] if totals else list(s.rank_flops)
        return totals

    @property
    def mean_sparse_density(self) -> float | None:
        """Mean density over every sparse attention call (``None`` without any)."""
        calls = self.sparse_calls
        return sum(s.sparse_density * s.sparse for s in self.steps if s.sparse) / calls if calls else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "wall_seconds": self.wall_seconds,
            "attention_calls": self.attention_calls,
            "sparse_calls": self.sparse_calls,
            "calibrations": self.calibrations,
            "mean_sparse_density": self.mean_sparse_density,
            "calibration_seconds": self.calibration_seconds,
            "rank_attention_flops": self.rank_attention_flops,
            "steps": [s.to_dict() for s in self.steps],
            "plans": [p.to_dict() for p in self.plans],
            "checks": [c.to_dict() for c in self.checks],
        }
