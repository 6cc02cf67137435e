"""The planner: from one dense attention call's q and k to a per-head :class:`BlockSparsePlan`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .budget import Budget
from .calibration import measure_block_mass
from .config import SparseAttentionConfig
from .families import adaptive_block_mask
from .layout import TokenLayout
from .plan import BlockSparsePlan


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
    start = time.perf_counter()
    blocks = config.block_sizes
    order = layout.tile_order(config.tile).to(q.device)
    mass = measure_block_mass(q, k, layout, blocks, order=order, backend=config.backend)
    if share_batch:
        mass = mass.mean(0, keepdim=True)
    budget = Budget.from_config(config)
    if config.pattern == "adaptive":
        mask = adaptive_block_mask(mass, layout, blocks, budget)
    elif config.pattern == "dense":
        mask = torch.ones_like(mass, dtype=torch.bool)
    else:
        raise NotImplementedError(f"pattern {config.pattern!r} is not available yet; use 'adaptive' or 'dense'")
    plan = BlockSparsePlan.from_block_mask(mask, layout, blocks, q_order=order, kv_order=order)
    heads = [[config.pattern] * mass.shape[1] for _ in range(mass.shape[0])]
    report = PlanReport(heads, recall(mass, plan.to_block_mask(), layout, blocks[0]), plan.density(per_head=True),
                        time.perf_counter() - start)
    return plan, report


def recall(mass: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, block_size_q: int) -> torch.Tensor:
    """``[B, H]`` share of the attention mass ``mask`` keeps, every query weighted equally."""
    queries = torch.clamp(layout.seq_len - torch.arange(mass.shape[-2], device=mass.device) * block_size_q, max=block_size_q)
    kept = (mass * mask).sum(-1)
    return (kept * queries).sum(-1) / queries.sum()
