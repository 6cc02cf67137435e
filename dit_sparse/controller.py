"""The controller every wrapped transformer of a pipeline shares: the step clock, the dense /
calibrate / sparse schedule, the plan cache and the statistics. It knows layouts, plans and steps;
the diffusers side (hooks and processors in ``dit_sparse.pipelines``) tells it about each call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .attention import sparse_attention
from .config import SparseAttentionConfig
from .drift import plan_error
from .layout import TokenLayout
from .plan import BlockSparsePlan
from .plan_cache import CachedPlan, PlanCache, PlanKey
from .planner import PlanReport, build_plan
from .schedule import Phase, StepClock, StepSchedule
from .stats import PlanCheck, PlanStats, SparseRunStats, StepStats
from .ulysses import UlyssesGroup, balanced_head_order

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
        ulysses: under Ulysses context parallelism, the group the heads are split over: every
            self-attention call then passes this rank's sequence shard of every head, calibration
            and the sparse op see the whole sequence of this rank's heads, and plans, plan files and
            statistics cover every head, as with one process.

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
        ulysses: UlyssesGroup | None = None,
    ) -> None:
        self.config = config
        self.ulysses = ulysses
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

        ``query``, ``key``, ``value`` are ``(B, S, H, D)`` exactly as the stock call sees them (under
        Ulysses, ``(B, S/P, H, D)``: this rank's sequence shard); the result is what ``dense()``
        returns, in the same layout.
        """
        call = self._calls.get(transformer)
        if call is None:
            return dense()
        ranks = 1 if self.ulysses is None else self.ulysses.size
        flops = 4 * query.shape[0] * call.layout.seq_len**2 * query.shape[3] * query.shape[2] / ranks
        phase = Phase.DENSE if self.force_dense else self._schedule.phase(call.step, call.first_step, layer)
        if phase is Phase.DENSE:
            call.record.dense += 1
            call.record.add_flops([flops] * ranks)
            return dense()
        plan_key = PlanKey(transformer, layer, call.plan_context, call.layout.geometry)
        entry = self.plans.get(plan_key)
        due = entry is None or not (self._kept(entry) or self._current(entry, call))
        if phase is Phase.CALIBRATE:
            out = dense()
            call.record.dense += 1
            call.record.add_flops([flops] * ranks)
            if due:
                self._calibrate(plan_key, call, *self._to_heads(call, query, key, value))
            return out
        heads = None
        if due:  # the layer did not run at its calibration step (a step cache skipped it): calibrate now
            heads = self._to_heads(call, query, key, value)
            entry = self._calibrate(plan_key, call, *heads)
        elif self.config.recalibrate_error is not None:
            heads = self._to_heads(call, query, key, value, entry.head_order)
            if self._drifted(plan_key, entry, call, heads):
                if entry.head_order is not None:
                    heads = self._to_heads(call, query, key, value)
                entry = self._calibrate(plan_key, call, *heads)
        if entry.plan.device != query.device:
            self.plans.to(query.device)
        if heads is None or entry.head_order is not None:
            heads = self._to_heads(call, query, key, value, entry.head_order)
        call.record.add_sparse(entry.density)
        call.record.add_flops([flops * density for density in entry.rank_density])
        out = sparse_attention(*heads, entry.plan_for(call.layout), backend=self.config.backend)
        return self._to_sequence(call, out, entry.head_order)

    # ----------------------------------------------------------------- plans

    def save_plans(self, path: str | Path) -> None:
        """Write the cached plans to a safetensors file (with the model, layouts and config).

        Under Ulysses every rank calls it: the file holds every head and the group's first rank
        writes it; it loads under any number of ranks, one included.
        """
        if self.ulysses is None:
            self.plans.save(path, self.model, self.config.plan_signature())
            return
        if not len(self.plans):
            raise ValueError("there are no plans to save: run the pipeline once (past the calibration step) first")
        whole = self._whole_layer_plans()
        if self.ulysses.rank == 0:
            whole.save(path, self.model, self.config.plan_signature())
        dist.barrier(group=self.ulysses.group)

    def load_plans(self, path: str | Path) -> int:
        """Load plans saved by :meth:`save_plans`; they skip calibration. Returns how many.

        Under Ulysses every rank calls it and keeps its own heads of every plan.

        Raises ``ValueError`` naming what differs when the file is for another model or config; a
        call at a layout the file has no plans for is refused later, at that call.
        """
        if self.ulysses is None:
            count = self.plans.load(path, self.model, self.config.plan_signature())
        else:
            whole = PlanCache()
            count = whole.load(path, self.model, self.config.plan_signature())
            sliced: dict[int, tuple[BlockSparsePlan, list[float], torch.Tensor | None]] = {}
            for key, entry in whole.items():
                if id(entry.plan) not in sliced:
                    sliced[id(entry.plan)] = self._rank_slice(entry.plan)
                plan, rank_density, head_order = sliced[id(entry.plan)]
                self.plans.put(key, plan, None, None, None, rank_density, head_order)
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

    def _to_heads(
        self, call: _Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        head_order: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Under Ulysses, the whole sequence of this rank's heads (its slice of ``head_order`` when
        given, else of the natural order); otherwise the tensors as they are."""
        if self.ulysses is None:
            return query, key, value
        if head_order is not None:
            query, key, value = (x.index_select(2, head_order) for x in (query, key, value))
        return tuple(self.ulysses.to_heads(x, call.layout) for x in (query, key, value))

    def _to_sequence(self, call: _Call, out: torch.Tensor, head_order: torch.Tensor | None) -> torch.Tensor:
        """The inverse of :meth:`_to_heads` for the attention output."""
        if self.ulysses is None:
            return out
        out = self.ulysses.to_sequence(out, call.layout)
        return out if head_order is None else out.index_select(2, TokenLayout.inverse(head_order))

    def _calibrate(
        self, plan_key: PlanKey, call: _Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> CachedPlan:
        plan, report = build_plan(
            query, key, call.layout, self.config, share_batch=not self.config.per_context_plans, v=value,
            ulysses=self.ulysses,
        )
        rank_density, head_order = None, None
        if self.ulysses is not None:
            report, rank_density = _whole_layer_report(report, self.ulysses)
            if self.config.balance_heads:
                plan, rank_density, head_order = self._rank_slice(self._gather_heads(plan))
        entry = self.plans.put(plan_key, plan, report, self._generation, call.step, rank_density, head_order)
        call.record.calibrations += 1
        self._stats.plans.append(PlanStats(
            transformer=plan_key.transformer, layer=plan_key.layer, context=plan_key.context, step=call.step,
            grid=call.layout.grid, text_len=call.layout.text_len, family=report.family,
            recall=report.recall.tolist(), density=report.density.tolist(), seconds=report.seconds,
            error=None if report.error is None else report.error.tolist(),
        ))
        return entry

    def _drifted(
        self, plan_key: PlanKey, entry: CachedPlan, call: _Call, heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> bool:
        """Check ``entry``'s plan on this call's sampled rows, record the check, and say whether its
        error (averaged over every head of the layer, every rank's under Ulysses) passes the bound."""
        error = plan_error(entry.plan_for(call.layout), *heads, self.config.check_rows, self.config.seed + call.step)
        if self.ulysses is not None:
            error = self.ulysses.gather(error, dim=-1)
            if entry.head_order is not None:
                error = error.index_select(-1, TokenLayout.inverse(entry.head_order).to(error.device))
        mean = float(error.double().mean())
        drifted = mean > self.config.recalibrate_error
        self._stats.checks.append(PlanCheck(
            transformer=plan_key.transformer, layer=plan_key.layer, context=plan_key.context, step=call.step,
            plan_step=entry.step, error=error.tolist(), mean_error=mean, recalibrated=drifted,
        ))
        return drifted

    def _gather_heads(self, plan: BlockSparsePlan) -> BlockSparsePlan:
        """Every rank's heads of ``plan``, in rank order (a collective: every rank calls it)."""
        parts = self.ulysses.gather_objects({name: t.cpu() for name, t in plan.tensors().items()})
        blocks = (plan.block_size_q, plan.block_size_k)
        return BlockSparsePlan.concat_heads(
            [BlockSparsePlan.from_tensors(part, plan.layout, blocks) for part in parts]
        ).to(plan.device)

    def _whole_layer_plans(self) -> PlanCache:
        """Every cached plan with every rank's heads, in the natural head order (a collective). One
        gather per entry: two entries may share a plan on one rank and not on another."""
        whole = PlanCache()
        for key, entry in self.plans.items():
            plan = self._gather_heads(entry.plan)
            if entry.head_order is not None:
                plan = plan.select_heads(TokenLayout.inverse(entry.head_order).tolist())
            whole.put(key, plan, entry.report, entry.generation, entry.step)
        return whole

    def _rank_slice(self, plan: BlockSparsePlan) -> tuple[BlockSparsePlan, list[float], torch.Tensor | None]:
        """This rank's heads of a plan of every head, the density of every rank's heads, and the head
        order the ranks hold slices of (``None``: natural; balanced with ``config.balance_heads``)."""
        per_head = plan.density(per_head=True)
        order = None
        if self.config.balance_heads:
            order = balanced_head_order(per_head.sum(0), self.ulysses.size).to(plan.device)
            per_head = per_head.index_select(1, order.to(per_head.device))
        heads = self.ulysses.heads(plan.num_heads)
        mine = list(heads) if order is None else order[heads.start : heads.stop].tolist()
        rank_density = per_head.view(per_head.shape[0], self.ulysses.size, -1).mean((0, 2)).tolist()
        return plan.select_heads(mine), rank_density, order


def _whole_layer_report(report: PlanReport, ulysses: UlyssesGroup) -> tuple[PlanReport, list[float]]:
    """The report of every rank's heads (in head order) and the mean density of each rank's heads."""
    parts = ulysses.gather_objects((
        report.family, report.recall.cpu(), report.density.cpu(), None if report.error is None else report.error.cpu()
    ))
    family = [sum((part[0][b] for part in parts), []) for b in range(len(report.family))]
    recall, density = (torch.cat([part[i] for part in parts], -1) for i in (1, 2))
    error = None if report.error is None else torch.cat([part[3] for part in parts], -1)
    whole = PlanReport(family, recall, density, report.seconds, error)
    return whole, [float(part[2].double().mean()) for part in parts]


def _describe(geometries) -> str:
    return ", ".join(f"grid {grid} + {text} text tokens" for grid, text, _ in sorted(geometries))
