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

__all__ = ["Candidate", "RowSample", "estimate_errors", "estimate_errors_and_recall", "sample_rows"]


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


# Sampled rows scored at a time, and the float elements a group of heads may hold at once (its keys
# and values in order, its scores and weights): heads are scored together up to that bound.
_ROW_CHUNK = 64
_CHUNK_ELEMENTS = 2**25


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
    return estimate_errors_and_recall(sample, block_size, orders, candidates, plan_batch, starts)[0]


def estimate_errors_and_recall(
    sample: RowSample,
    block_size: tuple[int, int],
    orders: dict[str, tuple[torch.Tensor, torch.Tensor]],
    candidates: list[Candidate],
    plan_batch: int,
    starts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`estimate_errors` and, from the same rows, each candidate's recall ``[C, plan_batch, H]``:
    the share of a sampled row's attention mass its mask keeps, averaged over the rows.

    Example::

        >>> layout = TokenLayout((2, 8, 8))
        >>> q, k, v = (torch.randn(1, 128, 2, 16) for _ in range(3))
        >>> sample = RowSample.of(q, k, v, layout, count=16, seed=0)
        >>> order = torch.arange(128)
        >>> full = torch.ones(1, 2, 4, 4, dtype=torch.bool)
        >>> errors, recall = estimate_errors_and_recall(sample, (32, 32), {"raster": (order, order)}, [Candidate(full, "raster")], 1)
        >>> recall.tolist()
        [[[1.0, 1.0]]]
    """
    layout, k, v = sample.layout, sample.k, sample.v
    batch, seq, heads, dim = k.shape
    bq, bk = block_size
    starts = starts or {}
    scale = dim**-0.5
    key_bias = torch.zeros(batch, seq, device=k.device).masked_fill_(layout.key_padding(batch).to(k.device), float("-inf"))
    sq_err = torch.zeros(len(candidates), batch, heads, device=k.device, dtype=torch.float64)
    sq_ref = torch.zeros(batch, heads, device=k.device, dtype=torch.float64)
    kept_share = torch.zeros(len(candidates), batch, heads, device=k.device, dtype=torch.float64)
    groups = []
    for name, (q_order, kv_order) in orders.items():
        members = [i for i, c in enumerate(candidates) if c.orders == name]
        if not members:
            continue
        q_order, kv_order = (_per_head(o, batch, heads) for o in (q_order, kv_order))
        q_bounds, k_bounds = (_bounds(b, layout, size, batch, heads, k.device) for b, size in zip(starts.get(name, (None, None)), block_size))
        groups.append(_OrderGroup(
            members, torch.stack([candidates[i].mask.expand(batch, heads, -1, -1) for i in members]),   # [M, B, H, nQ, nK]
            kv_order, q_bounds, k_bounds, _text_blocks(k_bounds, layout), _text_blocks(q_bounds, layout),
            TokenLayout.inverse(q_order)[..., sample.rows],                                              # [B, H, R]
            name in starts,
        ))
    # each group of heads holds its keys and values, those values in every order's blocks, and its scores and weights
    head_chunk = max(1, min(heads, _CHUNK_ELEMENTS // (seq * ((2 + len(groups)) * dim + 3 * _ROW_CHUNK))))
    no_key = torch.full((batch, 1), float("-inf"), device=k.device)
    key_bias = torch.cat([key_bias, no_key], 1)[:, :, None]                                     # [B, S + 1, 1]
    for b in range(batch):
        for first in range(0, heads, head_chunk):
            hs = slice(first, min(first + head_chunk, heads))
            # keys and values in the original order, and a last row that is no key: slots past a block's end read it
            k_heads, v_heads = (torch.nn.functional.pad(x[b, :, hs].transpose(0, 1).float(), (0, 0, 0, 1)) for x in (k, v))
            slots = [_slot_classes(g.kv_order[b, hs], g.k_bounds[b, hs], bk, seq, g.variable) for g in groups]
            values = [[v_heads.flatten(0, 1).index_select(0, rows).view(-1, width, dim) for _, width, rows in classes]
                      for classes in slots]                                                            # [n, width, D] each
            for rows in torch.arange(len(sample.rows), device=k.device).split(_ROW_CHUNK):
                q_rows = sample.q_rows[b, rows, hs].float().transpose(0, 1) * scale                    # [h, r, D]
                scores = torch.baddbmm(key_bias[b], k_heads, q_rows.transpose(1, 2))                   # [h, S + 1, r]
                weights = (scores - scores.amax(1, keepdim=True)).exp().flatten(0, 1)                  # [h * (S + 1), r]
                del scores
                h, r = q_rows.shape[:2]
                for g, classes, in_blocks in zip(groups, slots, values):
                    numer, denom = _block_sums(weights, classes, in_blocks, h * (g.k_bounds.shape[-1] - 1))
                    numer, denom = numer.view(h, -1, r, dim), denom.view(h, -1, r)                     # [h, nK, r, (D)]
                    total = denom.sum(1)                                                               # [h, r]
                    dense = numer.sum(1) / total[..., None]                                            # [h, r, D]
                    if g is groups[0]:
                        sq_ref[b, hs] += dense.double().pow(2).sum((1, 2))
                    q_block = torch.searchsorted(g.q_bounds[b, hs, 1:].contiguous(), g.positions[b, hs][:, rows].contiguous(),
                                                 right=True)                                           # [h, r]
                    row_masks = g.masks[:, b, hs].gather(
                        2, q_block[None, ..., None].expand(len(g.members), -1, -1, g.masks.shape[-1]))
                    text_row = g.text_query[b, hs].gather(1, q_block)[..., None]
                    row_masks = (row_masks | g.text_key[b, hs][:, None, :] | text_row).float()         # [M, h, r, nK]
                    kept = (row_masks * denom.transpose(1, 2)).sum(-1, keepdim=True)
                    kept_share[g.members, b, hs] += (kept[..., 0] / total[None]).double().sum(-1)
                    out = torch.einsum("mhrc,hcrd->mhrd", row_masks, numer) / kept.clamp(min=1e-30)
                    out = torch.where(kept > 0, out, 0.0)
                    sq_err[g.members, b, hs] += (out - dense).double().pow(2).sum((2, 3))
    rows_seen = torch.full_like(sq_ref, len(sample.rows))
    if plan_batch == 1:
        sq_err, sq_ref = sq_err.sum(1, keepdim=True), sq_ref.sum(0, keepdim=True)
        kept_share, rows_seen = kept_share.sum(1, keepdim=True), rows_seen.sum(0, keepdim=True)
    return (sq_err / sq_ref.clamp(min=1e-30)).sqrt().float(), (kept_share / rows_seen).float()


@dataclass
class _OrderGroup:
    """The candidates over one named order, and that order's blocks (``[B, H, ...]``)."""

    members: list[int]
    masks: torch.Tensor
    kv_order: torch.Tensor
    q_bounds: torch.Tensor
    k_bounds: torch.Tensor
    text_key: torch.Tensor
    text_query: torch.Tensor
    positions: torch.Tensor
    variable: bool


def _per_head(order: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    while order.dim() < 3:
        order = order.unsqueeze(0)
    return order.expand(batch, heads, -1)


def _bounds(starts: torch.Tensor | None, layout: TokenLayout, block: int, batch: int, heads: int, device) -> torch.Tensor:
    """``[B, H, n + 1]`` block boundaries (those of fixed blocks when ``starts`` is ``None``)."""
    return _per_head(block_bounds(None if starts is None else starts.long(), layout, block, device), batch, heads)


def _slot_classes(
    kv_order: torch.Tensor, bounds: torch.Tensor, block: int, seq: int, variable: bool
) -> list[tuple[torch.Tensor | None, int, torch.Tensor]]:
    """The key blocks of ``h`` heads (``[h, S]`` order, ``[h, nK + 1]`` block ``bounds``) as classes
    of slots of one width, ``(blocks, width, rows)``: ``blocks`` the flat indices (``head * nK +
    block``) of the class's blocks (``None``: every block, in order), ``rows`` the row of each slot
    (see :func:`_slot_rows`). Fixed blocks are one class of ``block`` slots; variable blocks go by
    their length rounded up to a quarter of ``block``, so a short block fills few slots, and empty
    blocks get none."""
    if not variable:
        return [(None, block, _slot_rows(kv_order, bounds, block, seq))]
    step = max(1, block // 4)
    widths = (-(-(bounds[:, 1:] - bounds[:, :-1]) // step) * step).flatten()
    classes = []
    for width in widths.unique().tolist():
        if width:
            blocks = torch.nonzero(widths == width).squeeze(1)
            classes.append((blocks, width, _slot_rows(kv_order, bounds, width, seq, blocks)))
    return classes


def _slot_rows(
    kv_order: torch.Tensor, bounds: torch.Tensor, width: int, seq: int, blocks: torch.Tensor | None = None
) -> torch.Tensor:
    """``[n * width]`` the row of each slot of the order's key blocks (``[h, S]`` order, ``[h, nK + 1]``
    block ``bounds``; ``width`` slots per block; the flat ``blocks`` ``head * nK + block``, default
    all) in ``h`` stacked key arrays of ``seq + 1`` rows each: its key's original position, or ``seq``
    (no key) past the block's end."""
    heads, n_k = bounds.shape[0], bounds.shape[1] - 1
    head = torch.arange(heads, device=bounds.device).repeat_interleave(n_k)
    first, end = bounds[:, :-1].flatten(), bounds[:, 1:].flatten()
    if blocks is not None:
        head, first, end = head[blocks], first[blocks], end[blocks]
    slots = first[:, None] + torch.arange(width, device=bounds.device)                          # [n, width]
    real = slots < end[:, None]
    keys = torch.where(real, kv_order[head[:, None], torch.where(real, slots, 0)], seq)
    return (keys + (seq + 1) * head[:, None]).flatten()


def _block_sums(
    weights: torch.Tensor, classes: list[tuple[torch.Tensor | None, int, torch.Tensor]], values: list[torch.Tensor],
    n_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block of :func:`_slot_classes`, ``[n_blocks, r, D]`` the softmax numerator
    (``weights`` ``[h * (S + 1), r]`` times the block's ``values``) and ``[n_blocks, r]`` the
    denominator; blocks no class holds are zero."""
    r, dim = weights.shape[1], values[0].shape[-1]
    if len(classes) == 1 and classes[0][0] is None:
        blocked = weights.index_select(0, classes[0][2]).view(n_blocks, -1, r)
        return torch.bmm(blocked.transpose(1, 2), values[0]), blocked.sum(1)
    numer, denom = weights.new_zeros(n_blocks, r, dim), weights.new_zeros(n_blocks, r)
    for (blocks, width, rows), in_blocks in zip(classes, values):
        blocked = weights.index_select(0, rows).view(-1, width, r)                              # [n, width, r]
        numer[blocks] = torch.bmm(blocked.transpose(1, 2), in_blocks)
        denom[blocks] = blocked.sum(1)
    return numer, denom
