"""The planner: from one dense attention call's q and k to a per-head :class:`BlockSparsePlan`.

Calibration measures what the families need once: the block mass over the tile order and, for the
semantic family, each head's query/key clustering and the block mass over its cluster orders.
Planning turns that into a mask per head for the configured pattern and budget; ``auto`` keeps, per
head, the family whose mask serves the budget best (highest recall at the density; the sparsest
mask reaching ``top_p``), and leaves dense the heads that no family serves above ``min_recall``.
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
from .plan import BlockSparsePlan
from .scoring import BestPerHead, recall

FAMILIES = ("radial", "spatiotemporal", "semantic", "adaptive")

__all__ = ["FAMILIES", "Calibration", "PlanReport", "build_plan", "calibrate", "plan_from_calibration", "recall"]


@dataclass
class PlanReport:
    """What the planner chose for each batch element and head.

    Attributes:
        family: ``[B][H]`` family names (``"dense"`` for heads left dense).
        recall: ``[B, H]`` share of the measured attention mass the plan keeps.
        density: ``[B, H]`` fraction of the attention FLOPs the plan keeps.
        seconds: wall time of calibration and planning.
    """

    family: list[list[str]]
    recall: torch.Tensor
    density: torch.Tensor
    seconds: float


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


def build_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    config: SparseAttentionConfig,
    share_batch: bool = False,
) -> tuple[BlockSparsePlan, PlanReport]:
    """Calibrate on one attention call and plan every head.

    Args:
        q, k: ``(B, S, H, D)`` exactly as the attention call sees them (after norms and RoPE).
        layout: the call's token layout.
        config: pattern, budget, block size and tile shape.
        share_batch: one plan for the whole batch (block mass averaged over it) instead of one
            per batch element.

    Returns the plan (on ``q``'s device; batch size 1 if ``share_batch`` else B) and a report.

    Example::

        >>> from dit_sparse import SparseAttentionConfig, TokenLayout
        >>> layout = TokenLayout((4, 16, 16))
        >>> q, k = torch.randn(1, 1024, 2, 32), torch.randn(1, 1024, 2, 32)
        >>> plan, report = build_plan(q, k, layout, SparseAttentionConfig(pattern="adaptive", density=0.25))
        >>> plan.density()
        0.25
    """
    return plan_from_calibration(calibrate(q, k, layout, config, share_batch), config)


def calibrate(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    config: SparseAttentionConfig,
    share_batch: bool = False,
) -> Calibration:
    """Measure what ``config.pattern`` needs from one attention call (see :func:`build_plan`).

    Never holds an ``S x S`` matrix: block masses come from the chunked two-pass measurement
    (the Triton kernel on CUDA).
    """
    start = time.perf_counter()
    _check_inputs(q, k, layout)
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
    batch = 1 if share_batch else q.shape[0]
    return Calibration(
        layout, blocks, tile, batch, q.shape[2], tile_order, tile_mass, clustering, semantic_mass,
        time.perf_counter() - start,
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
    best = BestPerHead(budget, layout, blocks)
    for name in families:
        mask, mass = _family_mask(name, calibration, budget)
        best.offer(mask, mass)
    chosen = [[families[i] for i in row] for row in best.index.tolist()]
    mask, kept = best.mask, best.recall
    if config.pattern == "auto":
        dense = kept < config.min_recall
        mask = mask | dense[..., None, None]
        kept = torch.where(dense, 1.0, kept)
        chosen = [[name if not d else "dense" for name, d in zip(names, row)] for names, row in zip(chosen, dense.tolist())]
    q_order, kv_order = _orders(calibration, chosen)
    plan = BlockSparsePlan.from_block_mask(mask, layout, blocks, q_order=q_order, kv_order=kv_order)
    seconds = calibration.seconds + time.perf_counter() - start
    return plan, PlanReport(chosen, kept, plan.density(per_head=True), seconds)


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
