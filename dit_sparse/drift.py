"""Whether a cached plan still fits the current step: its estimated output error on a few sampled
query rows, the per-step check behind ``SparseAttentionConfig(recalibrate_error=...)``.

The check computes the exact attention of ``rows`` query rows per head (``rows x S`` scores, never
``S x S``) and the output the plan gives them, so it costs about ``rows / S`` of a dense call.
"""

from __future__ import annotations

import torch

from .output_error import Candidate, RowSample, estimate_errors
from .plan import BlockSparsePlan

__all__ = ["plan_error"]


def plan_error(
    plan: BlockSparsePlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: int, seed: int
) -> torch.Tensor:
    """``[B|1, H]`` relative output error ``||sparse - dense|| / ||dense||`` of ``plan`` on ``rows``
    sampled video query rows of the ``(B, S, H, D)`` call ``query``, ``key``, ``value`` (one entry per
    batch element when the plan has one per element, else pooled over the batch).

    Example::

        >>> from dit_sparse import TokenLayout
        >>> layout = TokenLayout((2, 8, 8))
        >>> q, k, v = (torch.randn(1, 128, 2, 16) for _ in range(3))
        >>> full = BlockSparsePlan.from_block_mask(torch.ones(2, 4, 4, dtype=torch.bool), layout, 32)
        >>> plan_error(full, q, k, v, rows=16, seed=0).abs().max().item() < 1e-6
        True
    """
    sample = RowSample.of(query, key, value, plan.layout, rows, seed)
    orders = {"plan": (plan.order("q"), plan.order("kv"))}
    starts = {"plan": (plan.q_starts, plan.kv_starts)} if plan.variable_blocks else None
    candidate = Candidate(plan.to_block_mask(), "plan")
    return estimate_errors(sample, (plan.block_size_q, plan.block_size_k), orders, [candidate], plan.batch_size, starts)[0]
