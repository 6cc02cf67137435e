"""The planner: from one dense attention call's q and k to a per-head :class:`BlockSparsePlan`.

Calibration measures what the families need once: the block mass over the tile order and, for the
semantic family, each head's query/key clustering and the block mass over its cluster orders.
Planning turns that into a mask per head for the configured pattern and budget. ``auto`` keeps, per
head, the family whose mask has the lowest estimated output error at the budget (exact dense and
sparse outputs on sampled query rows), then spends at most ``fallback_share`` of the budget on more
density (1.5 to 4 times the budget, or dense) for the heads whose error exceeds ``max_error``,
worst first. With ``min_recall`` set (or a ``top_p`` budget) it keeps the recall rule instead: the
family whose mask keeps the most measured attention mass, and heads below ``min_recall`` dense.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .budget import Budget
from .calibration import measure_block_mass
from .config import SparseAttentionConfig
from .families import adaptive_block_mask, cluster_heads, fit_radial, fit_spatiotemporal, semantic_block_mask
from .families.semantic import SemanticClustering
from .layout import TokenLayout
from .output_error import Candidate, RowSample, estimate_errors
from .plan import BlockSparsePlan
from .scoring import BestPerHead, recall, target_density, video_density

FAMILIES = ("radial", "spatiotemporal", "semantic", "adaptive")
# The densities, in multiples of the budget's, that auto's fallback may raise a head to (or dense).
FALLBACK_LEVELS = (1.5, 2.0, 3.0, 4.0)

__all__ = ["FAMILIES", "Calibration", "PlanReport", "build_plan", "calibrate", "plan_from_calibration", "recall"]


@dataclass
class PlanReport:
    """What the planner chose for each batch element and head.

    Attributes:
        family: ``[B][H]`` family names (``"dense"`` for heads left dense).
        recall: ``[B, H]`` share of the measured attention mass the plan keeps.
        density: ``[B, H]`` fraction of the attention FLOPs the plan keeps.
        seconds: wall time of calibration and planning.
        error: ``[B, H]`` estimated relative output error on the sampled query rows (``None`` when
            the pattern did not estimate it).
    """

    family: list[list[str]]
    recall: torch.Tensor
    density: torch.Tensor
    seconds: float
    error: torch.Tensor | None = None


@dataclass
class Calibration:
    """What one dense attention call tells the planner (reusable for several budgets).

    Attributes:
        layout, block_size, tile: the geometry it was measured on.
        batch_size, num_heads: the plans' batch (1 when shared across the batch) and heads.
        tile_order: ``[S]`` the tile order the static and adaptive families use.
        tile_mass: ``[B, H, nQ, nK]`` block mass over the tile order.
        clustering: the semantic family's k-means (``None`` when no pattern needs it).
        semantic_mass: ``[B, H, nQ, nK]`` block mass over the cluster orders (or ``None``).
        seconds: wall time of the calibration.
        rows: the sampled query rows, keys and values for the output-error estimate (``None`` when
            the pattern does not choose by error).
    """

    layout: TokenLayout
    block_size: tuple[int, int]
    tile: tuple[int, int, int]
    batch_size: int
    num_heads: int
    tile_order: torch.Tensor
    tile_mass: torch.Tensor | None
    clustering: SemanticClustering | None
    semantic_mass: torch.Tensor | None
    seconds: float
    rows: RowSample | None = None


def build_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    config: SparseAttentionConfig,
    share_batch: bool = False,
    v: torch.Tensor | None = None,
) -> tuple[BlockSparsePlan, PlanReport]:
    """Calibrate on one attention call and plan every head.

    Args:
        q, k: ``(B, S, H, D)`` exactly as the attention call sees them (after norms and RoPE).
        layout: the call's token layout.
        config: pattern, budget, block size and tile shape.
        share_batch: one plan for the whole batch (block mass averaged over it) instead of one
            per batch element.
        v: ``(B, S, H, D)`` values, needed when ``config.chooses_by_error`` (``pattern="auto"``,
            the default).

    Returns the plan (on ``q``'s device; batch size 1 if ``share_batch`` else B) and a report.

    Example::

        >>> from dit_sparse import SparseAttentionConfig, TokenLayout
        >>> layout = TokenLayout((4, 16, 16))
        >>> q, k = torch.randn(1, 1024, 2, 32), torch.randn(1, 1024, 2, 32)
        >>> plan, report = build_plan(q, k, layout, SparseAttentionConfig(pattern="adaptive", density=0.25))
        >>> plan.density()
        0.25
    """
    return plan_from_calibration(calibrate(q, k, layout, config, share_batch, v=v), config)


def calibrate(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    config: SparseAttentionConfig,
    share_batch: bool = False,
    v: torch.Tensor | None = None,
) -> Calibration:
    """Measure what ``config.pattern`` needs from one attention call (see :func:`build_plan`).

    Never holds an ``S x S`` matrix: block masses come from the chunked two-pass measurement
    (the Triton kernel on CUDA), output errors from ``config.error_rows`` sampled query rows.
    """
    start = time.perf_counter()
    _check_inputs(q, k, layout)
    if config.chooses_by_error and v is None:
        raise ValueError(
            "pattern='auto' chooses each head's family by its output error and needs the values: pass v=..., "
            "or set min_recall (e.g. 0.0) to choose by measured recall instead"
        )
    blocks = config.block_sizes
    tile = config.tile_for(layout.grid)
    tile_order = layout.tile_order(tile).to(q.device)
    tile_mass = clustering = semantic_mass = None
    if config.pattern != "dense":
        tile_mass = _batch_mean(measure_block_mass(q, k, layout, blocks, order=tile_order, backend=config.backend), share_batch)
    if config.pattern in ("semantic", "auto"):
        q_in, k_in = (x.mean(0, keepdim=True) if share_batch else x for x in (q, k))
        clustering = cluster_heads(
            q_in, k_in, layout, config.query_clusters, config.key_clusters, config.kmeans_iters, config.seed
        )
        q_order, kv_order = clustering.orders(layout)
        semantic_mass = _batch_mean(
            measure_block_mass(q, k, layout, blocks, order=q_order, kv_order=kv_order, backend=config.backend),
            share_batch,
        )
    rows = RowSample.of(q, k, v, layout, config.error_rows, config.seed) if v is not None and config.pattern == "auto" else None
    batch = 1 if share_batch else q.shape[0]
    return Calibration(
        layout, blocks, tile, batch, q.shape[2], tile_order, tile_mass, clustering, semantic_mass,
        time.perf_counter() - start, rows,
    )


def plan_from_calibration(
    calibration: Calibration, config: SparseAttentionConfig
) -> tuple[BlockSparsePlan, PlanReport]:
    """Turn a calibration into a plan for ``config``'s pattern and budget (same block size)."""
    start = time.perf_counter()
    layout, blocks = calibration.layout, calibration.block_size
    if config.block_sizes != blocks:
        raise ValueError(f"the calibration was measured with blocks {blocks}, the config asks for {config.block_sizes}")
    if config.pattern == "dense":
        return _dense_plan(calibration, start)
    families = FAMILIES if config.pattern == "auto" else (config.pattern,)
    if calibration.semantic_mass is None and "semantic" in families:
        raise ValueError(f"this calibration has no clustering; calibrate with pattern={config.pattern!r}")
    budget = Budget.from_config(config)
    if config.chooses_by_error:
        if calibration.rows is None:
            raise ValueError("this calibration sampled no rows for the error estimate; calibrate with pattern='auto' and v=...")
        return _plan_by_error(calibration, config, budget, start)
    best = BestPerHead(budget, layout, blocks)
    for name in families:
        mask, mass = _family_mask(name, calibration, budget)
        best.offer(mask, mass)
    chosen = [[families[i] for i in row] for row in best.index.tolist()]
    mask, kept = best.mask, best.recall
    if config.pattern == "auto" and config.min_recall is not None:
        dense = kept < config.min_recall
        mask = mask | dense[..., None, None]
        kept = torch.where(dense, 1.0, kept)
        chosen = [[name if not d else "dense" for name, d in zip(names, row)] for names, row in zip(chosen, dense.tolist())]
    q_order, kv_order = _orders(calibration, chosen)
    plan = BlockSparsePlan.from_block_mask(mask, layout, blocks, q_order=q_order, kv_order=kv_order)
    seconds = calibration.seconds + time.perf_counter() - start
    return plan, PlanReport(chosen, kept, plan.density(per_head=True), seconds)


def _plan_by_error(
    calibration: Calibration, config: SparseAttentionConfig, budget: Budget, start: float
) -> tuple[BlockSparsePlan, PlanReport]:
    """``auto`` by estimated output error: each head's best family at the budget, then the fallback."""
    layout, blocks = calibration.layout, calibration.block_size
    target = target_density(budget, layout, blocks[1])
    level_budgets = [budget] + [Budget(density=target * f) for f in FALLBACK_LEVELS if target * f < 1]
    candidates, masses = [], []
    for level in level_budgets:
        for name in FAMILIES:
            mask, mass = _family_mask(name, calibration, level)
            candidates.append(Candidate(mask.expand_as(mass), "semantic" if name == "semantic" else "tile"))
            masses.append(mass)
    orders = {"tile": (calibration.tile_order, calibration.tile_order)}
    if calibration.clustering is not None:
        orders["semantic"] = calibration.clustering.orders(layout)
    errors = estimate_errors(calibration.rows, blocks, orders, candidates, calibration.batch_size)
    density = torch.stack([video_density(c.mask, layout, blocks) for c in candidates])
    kept = torch.stack([recall(m, c.mask, layout, blocks[0]) for c, m in zip(candidates, masses)])
    # per level, the family with the lowest error among those within the level's density (else the sparsest)
    n_f = len(FAMILIES)
    limits = torch.tensor([target] + [level.density for level in level_budgets[1:]], device=density.device)
    fits = density.view(len(level_budgets), n_f, *density.shape[1:]) <= limits[:, None, None, None] + 1e-6
    score = torch.where(fits, 10 - errors.view_as(fits.float()), -density.view_as(fits.float()))
    pick = score.argmax(1) + torch.arange(len(level_budgets), device=score.device)[:, None, None] * n_f  # [L, B, H]
    choice = _fallback(
        errors.gather(0, pick), density.gather(0, pick), config.max_error, (1 + config.fallback_share) * target
    )
    dense = choice == len(level_budgets)
    index = pick.gather(0, choice.clamp(max=len(level_budgets) - 1)[None])[0]                        # [B, H]
    stacked = torch.stack([c.mask for c in candidates])
    mask = stacked.gather(0, index[None, ..., None, None].expand(1, *stacked.shape[1:]))[0] | dense[..., None, None]
    chosen = [
        ["dense" if d else FAMILIES[i % n_f] for i, d in zip(row, dense_row)]
        for row, dense_row in zip(index.tolist(), dense.tolist())
    ]
    q_order, kv_order = _orders(calibration, chosen)
    plan = BlockSparsePlan.from_block_mask(mask, layout, blocks, q_order=q_order, kv_order=kv_order)
    kept = torch.where(dense, 1.0, kept.gather(0, index[None])[0])
    error = torch.where(dense, 0.0, errors.gather(0, index[None])[0])
    seconds = calibration.seconds + time.perf_counter() - start
    return plan, PlanReport(chosen, kept, plan.density(per_head=True), seconds, error)


def _fallback(errors: torch.Tensor, density: torch.Tensor, max_error: float, allowed_per_head: float) -> torch.Tensor:
    """``[B, H]`` the level each head gets (0 the budget's, ``L`` dense), from ``[L, B, H]`` errors and
    video densities of each level's choice.

    The call's heads share one pool: ``allowed_per_head`` times the heads, less what the level-0
    choices spend (so masks that under-spend the budget leave it to the fallback). Heads whose error
    exceeds ``max_error`` are served worst first: each takes the cheapest option that brings it
    within ``max_error``, else the one with the lowest error, among those the pool still affords.

    Example::

        >>> errors = torch.tensor([[[0.3, 0.02]], [[0.04, 0.01]]])       # levels x batch x heads
        >>> density = torch.tensor([[[0.1, 0.1]], [[0.2, 0.2]]])
        >>> _fallback(errors, density, max_error=0.05, allowed_per_head=0.15).tolist()
        [[1, 0]]
    """
    levels = errors.shape[0]
    options_error = torch.cat([errors, torch.zeros_like(errors[:1])]).flatten(1).tolist()
    options_density = torch.cat([density, torch.ones_like(density[:1])]).flatten(1).tolist()
    choice = [0] * len(options_error[0])
    pool = allowed_per_head * len(choice) - sum(options_density[0])
    for head in sorted(range(len(choice)), key=lambda h: -options_error[0][h]):
        now_error = options_error[0][head]
        if now_error <= max_error:
            break
        affordable = [
            level for level in range(1, levels + 1)
            if options_density[level][head] - options_density[0][head] <= pool + 1e-6 and options_error[level][head] < now_error
        ]
        if not affordable:
            continue
        within = [level for level in affordable if options_error[level][head] <= max_error]
        best = min(within, key=lambda lv: options_density[lv][head]) if within else min(affordable, key=lambda lv: options_error[lv][head])
        pool -= options_density[best][head] - options_density[0][head]
        choice[head] = best
    return torch.tensor(choice, device=errors.device).view(errors.shape[1:])


def _family_mask(name: str, calibration: Calibration, budget: Budget) -> tuple[torch.Tensor, torch.Tensor]:
    """One family's ``[B, H, nQ, nK]`` mask and the block mass over its orders."""
    layout, blocks, tile, mass = calibration.layout, calibration.block_size, calibration.tile, calibration.tile_mass
    if name == "radial":
        return fit_radial(mass, layout, tile, blocks, budget).mask, mass
    if name == "spatiotemporal":
        return fit_spatiotemporal(mass, layout, tile, blocks, budget).mask, mass
    if name == "semantic":
        return semantic_block_mask(calibration.clustering, layout, blocks, budget), calibration.semantic_mass
    return adaptive_block_mask(mass, layout, blocks, budget), mass


def _orders(calibration: Calibration, chosen: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key orders: each semantic head's cluster orders, the tile order elsewhere."""
    tile_order = calibration.tile_order
    semantic = torch.tensor([[name == "semantic" for name in row] for row in chosen], device=tile_order.device)
    if not semantic.any():
        return tile_order, tile_order
    q_order, kv_order = calibration.clustering.orders(calibration.layout)
    pick = semantic[..., None]
    return torch.where(pick, q_order, tile_order), torch.where(pick, kv_order, tile_order)


def _dense_plan(calibration: Calibration, start: float) -> tuple[BlockSparsePlan, PlanReport]:
    layout, (bq, bk) = calibration.layout, calibration.block_size
    batch, heads = calibration.batch_size, calibration.num_heads
    mask = torch.ones(batch, heads, layout.num_blocks(bq), layout.num_blocks(bk), dtype=torch.bool)
    plan = BlockSparsePlan.from_block_mask(mask.to(calibration.tile_order.device), layout, (bq, bk))
    report = PlanReport([["dense"] * heads for _ in range(batch)], torch.ones(batch, heads), plan.density(per_head=True),
                        calibration.seconds + time.perf_counter() - start)
    return plan, report


def _batch_mean(mass: torch.Tensor, share_batch: bool) -> torch.Tensor:
    return mass.mean(0, keepdim=True) if share_batch else mass


def _check_inputs(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must share one (B, S, H, D) shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] != layout.seq_len:
        raise ValueError(
            f"q has {q.shape[1]} tokens but the layout (grid {layout.grid} + {layout.text_len} text) has "
            f"{layout.seq_len}; pass the layout of this attention call"
        )
