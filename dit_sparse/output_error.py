"""Estimated output error of candidate block masks: exact dense and sparse attention outputs on a
sample of query rows.

For each sampled query row the exact softmax numerator and denominator are split by key block
(``numer[r, c] = sum_{j in c} exp(s_rj - m_r) v_j``, ``denom[r, c]`` likewise without ``v``), so the
output of any block mask is ``sum_c m_c numer[r, c] / sum_c m_c denom[r, c]``: one measurement per
key order serves every candidate mask over that order. Memory is ``O(rows x S)`` per head; never an
``S x S`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import TokenLayout
from .plan import _bounds as block_bounds
from .plan import _text_blocks

__all__ = ["Candidate", "RowSample", "estimate_errors", "sample_rows"]


def sample_rows(layout: TokenLayout, count: int, seed: int = 0, within: int | None = None) -> torch.Tensor:
    """``[R]`` original positions of ``count`` video query rows, one drawn at random from each of
    ``count`` equal strata of the video, or of its first ``within`` tokens (every such row when
    there are no more than ``count``).

    Example::

        >>> sample_rows(TokenLayout((2, 4, 4), text_len=8, text_first=True), 4, seed=0).tolist()
        [15, 21, 27, 39]
    """
    n = layout.video_len if within is None else min(within, layout.video_len)
    if count >= n:
        return torch.arange(n) + layout.video_offset
    g = torch.Generator().manual_seed(seed)
    starts = torch.arange(count, dtype=torch.float64) * n / count
    picks = (starts + torch.rand(count, generator=g, dtype=torch.float64) * (n / count)).long().clamp(max=n - 1)
    return picks + layout.video_offset


@dataclass
class RowSample:
    """What the error estimate needs from one attention call: the sampled query rows and the
    call's keys and values (references, no copies).

    Attributes:
        rows: ``[R]`` original positions of the sampled queries.
        q_rows: ``[B, R, H, D]`` those queries.
        k, v: ``(B, S, H, D)`` the call's keys and values.
        layout: the call's token layout (its text padding is excluded from the keys).
    """

    rows: torch.Tensor
    q_rows: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: TokenLayout

    @classmethod
    def of(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, count: int, seed: int,
        within: int | None = None,
    ) -> RowSample:
        """Sample ``count`` query rows of the ``(B, S, H, D)`` call (see :func:`sample_rows`)."""
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v must be (B, S, H, D) with k's B, S and H, got {tuple(v.shape)} and {tuple(k.shape)}")
        rows = sample_rows(layout, count, seed, within).to(q.device)
        return cls(rows, q[:, rows], k, v, layout)


# Sampled rows scored at a time: bounds the [rows, keys] score and weight buffers.
_ROW_CHUNK = 64


@dataclass
class Candidate:
    """A block mask ``[B|1, H, nQ, nK]`` over the token orders named ``orders`` (a key of the
    ``orders`` mapping given to :func:`estimate_errors`), and the family that made it."""

    mask: torch.Tensor
    orders: str
    family: str = ""


def estimate_errors(
    sample: RowSample,
    block_size: tuple[int, int],
    orders: dict[str, tuple[torch.Tensor, torch.Tensor]],
    candidates: list[Candidate],
    plan_batch: int,
    starts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """``[C, plan_batch, H]`` relative output error ``||sparse - dense|| / ||dense||`` of each
    candidate on the sampled rows, per head. Text blocks are attended as in a plan (every text key
    block, and everything from a text query block).

    Args:
        sample: the sampled rows and the call's keys and values.
        block_size: ``(query, key)`` block sizes of the masks.
        orders: named ``(q_order, kv_order)`` pairs, each ``[S]``, ``[H, S]`` or ``[B|1, H, S]``.
        candidates: the masks to score.
        plan_batch: 1 when the masks are shared by the batch (errors pool every element's rows),
            else the batch size.
        starts: by order name, ``(q_starts, kv_starts)`` ``[B|1, H|1, n + 1]`` when the masks over
            that order are over variable blocks (cluster-aligned ones); fixed blocks otherwise.

    Example::

        >>> layout = TokenLayout((2, 8, 8))
        >>> q, k, v = (torch.randn(1, 128, 2, 16) for _ in range(3))
        >>> sample = RowSample.of(q, k, v, layout, count=16, seed=0)
        >>> order = torch.arange(128)
        >>> full, diagonal = torch.ones(1, 2, 4, 4, dtype=torch.bool), torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4)
        >>> errors = estimate_errors(sample, (32, 32), {"raster": (order, order)}, [Candidate(full, "raster"), Candidate(diagonal, "raster")], 1)
        >>> errors[0].abs().max().item() < 1e-6, bool((errors[1] > 0.1).all())
        (True, True)
    """
    layout, k, v = sample.layout, sample.k, sample.v
    batch, seq, heads, dim = k.shape
    bq, bk = block_size
    starts = starts or {}
    scale = dim**-0.5
    key_bias = torch.zeros(batch, seq, device=k.device).masked_fill_(layout.key_padding(batch).to(k.device), float("-inf"))
    sq_err = torch.zeros(len(candidates), batch, heads, device=k.device, dtype=torch.float64)
    sq_ref = torch.zeros(batch, heads, device=k.device, dtype=torch.float64)
    reference_pending = True
    for name, (q_order, kv_order) in orders.items():
        members = [i for i, c in enumerate(candidates) if c.orders == name]
        if not members:
            continue
        q_order, kv_order = (_per_head(o, batch, heads) for o in (q_order, kv_order))
        masks = [candidates[i].mask for i in members]
        q_bounds, k_bounds = (_bounds(b, layout, size, batch, heads, k.device) for b, size in zip(starts.get(name, (None, None)), block_size))
        for b in range(batch):
            for h in range(heads):
                keys = kv_order[b, h]
                k_head, v_head = k[b, keys, h].float(), v[b, keys, h].float()
                positions = TokenLayout.inverse(q_order[b, h])[sample.rows]
                text_key = _text_blocks(k_bounds[b, h], layout)
                text_query = _text_blocks(q_bounds[b, h], layout)
                for rows in torch.arange(positions.numel(), device=k.device).split(_ROW_CHUNK):
                    scores = (sample.q_rows[b, rows, h].float() * scale) @ k_head.T + key_bias[b, keys]
                    scores, values = _key_blocks(scores, v_head, k_bounds[b, h], bk, name in starts)
                    weights = (scores - scores.flatten(1).amax(-1)[:, None, None]).exp()    # [R, nK, bk]
                    del scores
                    numer = torch.einsum("rcj,cjd->rcd", weights, values)                # [R, nK, D]
                    denom = weights.sum(-1)                                              # [R, nK]
                    del weights, values
                    dense = numer.sum(1) / denom.sum(1, keepdim=True)
                    if reference_pending:
                        sq_ref[b, h] += dense.double().pow(2).sum()
                    q_block = torch.searchsorted(q_bounds[b, h, 1:], positions[rows], right=True)
                    text_row = text_query[q_block][:, None]
                    row_masks = torch.stack([m[min(b, m.shape[0] - 1), h, q_block] for m in masks])   # [M, R, nK]
                    row_masks = (row_masks | text_key | text_row).float()
                    kept = (row_masks * denom).sum(-1, keepdim=True)
                    out = torch.einsum("mrc,rcd->mrd", row_masks, numer) / kept.clamp(min=1e-30)
                    out = torch.where(kept > 0, out, 0.0)
                    sq_err[members, b, h] += (out - dense).double().pow(2).sum((1, 2))
        reference_pending = False
    if plan_batch == 1:
        sq_err, sq_ref = sq_err.sum(1, keepdim=True), sq_ref.sum(0, keepdim=True)
    return (sq_err / sq_ref.clamp(min=1e-30)).sqrt().float()


def _per_head(order: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    while order.dim() < 3:
        order = order.unsqueeze(0)
    return order.expand(batch, heads, -1)


def _bounds(starts: torch.Tensor | None, layout: TokenLayout, block: int, batch: int, heads: int, device) -> torch.Tensor:
    """``[B, H, n + 1]`` block boundaries (those of fixed blocks when ``starts`` is ``None``)."""
    return _per_head(block_bounds(None if starts is None else starts.long(), layout, block, device), batch, heads)


def _key_blocks(
    scores: torch.Tensor, values: torch.Tensor, bounds: torch.Tensor, block: int, variable: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, S]`` scores and ``[S, D]`` values (in key order) as ``[R, nK, block]`` and
    ``[nK, block, D]``: slots past a block's end hold ``-inf`` scores and zero values (fixed blocks: a
    view, the last block padded)."""
    n = bounds.shape[0] - 1
    if not variable:
        pad = n * block - scores.shape[-1]
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        return scores.view(-1, n, block), torch.nn.functional.pad(values, (0, 0, 0, pad)).view(n, block, -1)
    slots = bounds[:-1, None] + torch.arange(block, device=bounds.device)
    real = slots < bounds[1:, None]
    slots = torch.where(real, slots, 0)
    return scores[:, slots].masked_fill(~real, float("-inf")), values[slots] * real[..., None]

