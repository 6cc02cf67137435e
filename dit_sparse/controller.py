"""The controller every wrapped transformer of a pipeline shares: the step clock, the dense /
calibrate / sparse schedule, the plan cache and the statistics. It knows layouts, plans and steps;
the diffusers side (hooks and processors in ``dit_sparse.pipelines``) tells it about each call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .attention import sparse_attention
from .config import SparseAttentionConfig
from .layout import TokenLayout
from .plan_cache import CachedPlan, PlanCache, PlanKey
from .planner import build_plan
from .schedule import Phase, StepClock, StepSchedule
from .stats import PlanStats, SparseRunStats, StepStats

SHARED_CONTEXT = "shared"
NO_CONTEXT = "default"


@dataclass
class _Call:
    """The transformer call in progress."""

    step: int
    first_step: int
    plan_context: str
    layout: TokenLayout
    record: StepStats


class SparseAttentionController:
    """Decides, for every self-attention call of the wrapped transformers, whether it runs dense,
    calibrates a plan, or runs sparse, and keeps the plans and statistics.

    The hook of each transformer calls :meth:`begin_call` / :meth:`end_call` around a forward pass
    and :meth:`finish_generation` when the pipeline call ends; each processor calls :meth:`attend`.

    Args:
        config: the configuration.
        model: what the wrapped transformers are (written into and checked against plan files).
        total_steps: where the run's length comes from when a call's cache context does not say
            (e.g. the pipeline's scheduler); returns ``None`` when unknown.

    Example::

        >>> from dit_sparse import SparseAttentionConfig, TokenLayout
        >>> controller = SparseAttentionController(SparseAttentionConfig(pattern="adaptive", block_size=16,
        ...                                        dense_steps=1, dense_layers=()))
        >>> layout = TokenLayout((2, 4, 8))
        >>> q = k = v = torch.randn(1, 64, 2, 8)
        >>> for t in (900.0, 800.0):
        ...     controller.begin_call("transformer", "cond", layout, timestep=t)
        ...     out = controller.attend("transformer", 0, q, k, v, dense=lambda: q)
        ...     controller.end_call("transformer")
        >>> controller.finish_generation()
        >>> [(s.step, s.dense, s.sparse, s.calibrations) for s in controller.last_stats.steps]
        [(0, 1, 0, 1), (1, 0, 1, 0)]
    """

    def __init__(
        self,
        config: SparseAttentionConfig,
        model: dict[str, Any] | None = None,
        total_steps: Callable[[], int | None] | None = None,
    ) -> None:
        self.config = config
        self.model = model or {}
        self.plans = PlanCache()
        self.force_dense = False
        self.last_stats: SparseRunStats | None = None
        self._total_steps = total_steps or (lambda: None)
        self._clock = StepClock()
        self._generation = 0
        self._schedule: StepSchedule | None = None
        self._stats = SparseRunStats()
        self._first_steps: dict[tuple[str, str], int] = {}
        self._calls: dict[str, _Call] = {}
        self._loaded_geometries: set = set()

    @property
    def step(self) -> int | None:
        """The step of the latest transformer call (``None`` between generations)."""
        return self._clock.step

    @property
    def generation(self) -> int:
        """How many generations have started."""
        return self._generation

    # ----------------------------------------------------------------- calls

    def begin_call(
        self,
        transformer: str,
        context: str | None,
        layout: TokenLayout,
        step_index: int | None = None,
        timestep: float | None = None,
        total_steps: int | None = None,
    ) -> None:
        """A transformer forward pass starts.

        Args:
            transformer: which transformer of the pipeline.
            context: the cache context's name (``None`` outside any).
            layout: the token layout its self-attention calls see.
            step_index, timestep: what the call carries to count steps with (see :class:`StepClock`).
            total_steps: the run's length when the call carries it.
        """
        if self._clock.advance(step_index, timestep):
            self._start_generation(total_steps)
        if self._loaded_geometries and layout.geometry not in self._loaded_geometries:
            raise ValueError(
                f"the loaded plans are for layouts {_describe(self._loaded_geometries)}, but this call has "
                f"{_describe({layout.geometry})}: generate at the size the plans were saved for, or call "
                "clear_plans() to calibrate for this one"
            )
        context = context or NO_CONTEXT
        step = self._clock.step
        first_step = self._first_steps.setdefault((transformer, context), step)
        plan_context = context if self.config.per_context_plans else SHARED_CONTEXT
        record = self._stats.step_stats(step, transformer, context)
        self._calls[transformer] = _Call(step, first_step, plan_context, layout, record)

    def end_call(self, transformer: str) -> None:
        self._calls.pop(transformer, None)

    def finish_generation(self) -> None:
        """The pipeline call is over: keep its statistics in :attr:`last_stats` and start counting
        afresh. Safe to call more than once."""
        self._close_generation()
        self._clock.reset()

    def attend(
        self,
        transformer: str,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        dense: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """Self-attention of layer ``layer``: ``dense()`` (the stock attention call) or sparse
        attention over the cached plan, calibrating one from ``query`` and ``key`` when due.

        ``query``, ``key``, ``value`` are ``(B, S, H, D)`` exactly as the stock call sees them; the
        result is what ``dense()`` returns, in the same layout.
        """
        call = self._calls.get(transformer)
        if call is None:
            return dense()
        if self.force_dense:
            call.record.dense += 1
            return dense()
        phase = self._schedule.phase(call.step, call.first_step, layer)
        if phase is Phase.DENSE:
            call.record.dense += 1
            return dense()
        plan_key = PlanKey(transformer, layer, call.plan_context, call.layout.geometry)
        entry = self.plans.get(plan_key)
        due = entry is None or not (self._kept(entry) or self._current(entry, call))
        if phase is Phase.CALIBRATE:
            out = dense()
            call.record.dense += 1
            if due:
                self._calibrate(plan_key, call, query, key, value)
            return out
        if due:  # the layer did not run at its calibration step (a step cache skipped it): calibrate now
            entry = self._calibrate(plan_key, call, query, key, value)
        if entry.plan.device != query.device:
            self.plans.to(query.device)
        call.record.add_sparse(entry.density)
        return sparse_attention(query, key, value, entry.plan_for(call.layout), backend=self.config.backend)

    # ----------------------------------------------------------------- plans

    def save_plans(self, path: str | Path) -> None:
        """Write the cached plans to a safetensors file (with the model, layouts and config)."""
        self.plans.save(path, self.model, self.config.plan_signature())

    def load_plans(self, path: str | Path) -> int:
        """Load plans saved by :meth:`save_plans`; they skip calibration. Returns how many.

        Raises ``ValueError`` naming what differs when the file is for another model or config; a
        call at a layout the file has no plans for is refused later, at that call.
        """
        count = self.plans.load(path, self.model, self.config.plan_signature())
        self._loaded_geometries = self.plans.geometries(loaded_only=True)
        return count

    def clear_plans(self) -> None:
        """Forget every plan, loaded ones included."""
        self.plans.clear()
        self._loaded_geometries = set()

    # ----------------------------------------------------------------- internals

    def _start_generation(self, total_steps: int | None) -> None:
        self._close_generation()
        total = total_steps if total_steps is not None else self._total_steps()
        try:
            self._schedule = StepSchedule(self.config, total)
        except ValueError:
            self._clock.reset()
            raise
        self._generation += 1

    def _close_generation(self) -> None:
        if self._stats.steps:
            self.last_stats = self._stats
        self._stats = SparseRunStats()
        self._first_steps.clear()
        self._calls.clear()

    def _kept(self, entry: CachedPlan) -> bool:
        """Whether ``entry`` serves without calibrating: loaded, or kept from an earlier call."""
        return entry.loaded or (self.config.reuse_plans and entry.generation != self._generation)

    def _current(self, entry: CachedPlan, call: _Call) -> bool:
        """Whether ``entry`` was calibrated in this generation at or after the calibration step that
        serves ``call``'s step."""
        due_step = self._schedule.calibration_step(call.step, call.first_step)
        return entry.generation == self._generation and entry.step >= due_step

    def _calibrate(
        self, plan_key: PlanKey, call: _Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> CachedPlan:
        plan, report = build_plan(
            query, key, call.layout, self.config, share_batch=not self.config.per_context_plans, v=value
        )
        entry = self.plans.put(plan_key, plan, report, self._generation, call.step)
        call.record.calibrations += 1
        self._stats.plans.append(PlanStats(
            transformer=plan_key.transformer, layer=plan_key.layer, context=plan_key.context, step=call.step,
            grid=call.layout.grid, text_len=call.layout.text_len, family=report.family,
            recall=report.recall.tolist(), density=report.density.tolist(), seconds=report.seconds,
            error=None if report.error is None else report.error.tolist(),
        ))
        return entry


def _describe(geometries) -> str:
    return ", ".join(f"grid {grid} + {text} text tokens" for grid, text, _ in sorted(geometries))
