"""Block-level attention mass in PyTorch: what each query block gives each key block.

The calibration measurement, chunked over queries so that memory stays ``O(chunk x S)``: the
``S x S`` score matrix never exists at once. The Triton twin is ``block_mass_triton``.

Layouts:
    q, k          [B, H, S, D]   (the sequence in the order whose blocks are measured)
    lse           [B, H, S] fp32 natural-log log-sum-exp of each query's scaled scores, or None
    kv_valid_len  [B] int or None (keys at positions >= it carry no mass)
    returns       [B, H, nQ, nK] fp32; row i is the mean, over the real queries of query block i,
                  of the softmax mass each key block receives (rows sum to 1)
"""

from __future__ import annotations

import torch

CHUNK_SCORES = 1 << 22
# on a GPU each chunk costs a few dozen kernel launches whatever its size: fewer, larger chunks
CHUNK_SCORES_CUDA = 1 << 26
# fewer query rows than this per matrix product waste the product's throughput
MIN_CHUNK_ROWS = 64


def chunk_scores(device: torch.device) -> int:
    """Scores a chunked pass holds at once on ``device``: a CPU's cache-sized chunk, or a GPU's
    larger one (``chunk_scores(torch.device("cpu")) == CHUNK_SCORES``)."""
    return CHUNK_SCORES_CUDA if device.type == "cuda" else CHUNK_SCORES


def block_mass_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size_q: int,
    block_size_k: int,
    lse: torch.Tensor | None = None,
    kv_valid_len: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Mean softmax mass per (query block, key block).

    Example::

        >>> q, k = torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
        >>> mass = block_mass_torch(q, k, 32, 32)
        >>> mass.shape, bool(torch.allclose(mass.sum(-1), torch.ones(1, 2, 4)))
        (torch.Size([1, 2, 4, 4]), True)
    """
    batch, heads, seq, dim = q.shape
    bq, bk = block_size_q, block_size_k
    n_q, n_k = -(-seq // bq), -(-seq // bk)
    scale = dim**-0.5 if scale is None else scale
    real_query = (torch.arange(n_q * bq, device=q.device) < seq).float().view(n_q, bq, 1)
    queries_per_block = real_query.sum((1, 2))

    qf = (_pad_rows(q.float(), n_q * bq) * scale).view(batch * heads, n_q * bq, dim)
    kf = _pad_rows(k.float(), n_k * bk).view(batch * heads, n_k * bk, dim)
    lse_f = None if lse is None else _pad_rows(lse.float().unsqueeze(-1), n_q * bq).view(batch * heads, n_q * bq, 1)
    bias = _key_bias(batch, heads, seq, n_k * bk, kv_valid_len, q.device)
    mass = torch.empty(batch * heads, n_q, n_k, dtype=torch.float32, device=q.device)
    chunk = chunk_scores(q.device)
    heads_per_chunk = max(1, min(batch * heads, chunk // (bq * n_k * bk)))
    blocks_per_chunk = max(1, chunk // (heads_per_chunk * bq * n_k * bk))
    for h in range(0, batch * heads, heads_per_chunk):
        group = slice(h, h + heads_per_chunk)
        for first in range(0, n_q, blocks_per_chunk):
            last = min(n_q, first + blocks_per_chunk)
            rows = slice(first * bq, last * bq)
            scores = torch.bmm(qf[group, rows], kf[group].transpose(1, 2))
            if bias is not None:
                scores += bias[group]
            if lse_f is None:
                scores -= scores.amax(-1, keepdim=True)
            else:
                scores -= lse_f[group, rows]
            per_key_block = scores.exp_().view(scores.shape[0], -1, n_k, bk).sum(-1)
            if lse_f is None:
                per_key_block /= per_key_block.sum(-1, keepdim=True)
            per_block = per_key_block.view(scores.shape[0], last - first, bq, n_k) * real_query[first:last]
            mass[group, first:last] = per_block.sum(2)
    return (mass / queries_per_block[:, None]).view(batch, heads, n_q, n_k)


def _key_bias(batch: int, heads: int, seq: int, padded: int, kv_valid_len: torch.Tensor | None, device) -> torch.Tensor | None:
    """``[B*H, 1, padded]``: 0 for real keys, ``-inf`` for padding and keys past ``kv_valid_len``
    (``None`` when every key is real)."""
    if kv_valid_len is None and padded == seq:
        return None
    limit = torch.full((batch,), seq, device=device) if kv_valid_len is None else kv_valid_len.to(device).clamp(max=seq)
    bias = torch.zeros(batch, padded, device=device)
    bias.masked_fill_(torch.arange(padded, device=device)[None, :] >= limit[:, None], float("-inf"))
    return bias.repeat_interleave(heads, 0)[:, None, :]


def _pad_rows(x: torch.Tensor, length: int) -> torch.Tensor:
    return x if x.shape[2] == length else torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[2]))


def block_mass_torch_orders(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size_q: int,
    block_size_k: int,
    orders: list[tuple[torch.Tensor, torch.Tensor]],
    key_bias: torch.Tensor | None = None,
    scale: float | None = None,
    query_rows: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """:func:`block_mass_torch` over several token orders from one pass over the scores.

    The scores of a query and a key do not depend on the order the blocks are cut from, so each
    chunk's softmax is computed once, in the original order, for every head at once, and summed
    into every order's key blocks and query blocks. Key orders shared by every head are summed
    through their common cells (runs of keys, consecutive in the original order, that share a block
    in each of them): when the cells have one length this is a reshape and a sum, with no gather.
    Other orders (per head, or over variable blocks) add each key's weight to its block in one
    scatter, with no copy of the weights in the order.

    Args:
        q, k: ``[B, H, S, D]`` in the original token order.
        orders: ``(q_order, kv_order)`` pairs, each ``[S]`` (shared by every head) or ``[B, H, S]``
            (``order[..., p]`` is the original position of the token at permuted position ``p``);
            or ``(q_order, kv_order, q_starts, kv_starts)`` with variable blocks: ``[B|1, H|1, n + 1]``
            boundaries in the order (``None``: fixed blocks). An empty query block's mass is zero.
        key_bias: ``[B, S]`` added to the scores, in the original order (``-inf`` for padding).
        query_rows: original positions of the queries to measure (every query block of every
            order must hold at least one); ``None`` measures every query. A block's mass is the mean
            over its measured queries.

    Returns one ``[B, H, nQ, nK]`` fp32 mass per order (rows sum to 1).

    Example::

        >>> q, k = torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
        >>> shuffled = torch.randperm(100)
        >>> masses = block_mass_torch_orders(q, k, 32, 32, [(torch.arange(100),) * 2, (shuffled, shuffled)])
        >>> torch.allclose(masses[1], block_mass_torch(q[:, :, shuffled], k[:, :, shuffled], 32, 32), atol=1e-6)
        True
    """
    batch, heads, seq, dim = q.shape
    bq, bk = block_size_q, block_size_k
    n_q, n_k = -(-seq // bq), -(-seq // bk)
    scale = dim**-0.5 if scale is None else scale
    device = q.device
    rows = torch.arange(seq, device=device) if query_rows is None else query_rows.to(device)
    starts = [tuple(pair[2:]) if len(pair) == 4 else (None, None) for pair in orders]
    orders = [tuple(pair[:2]) for pair in orders]
    q_blocks = [original_blocks(q_order, q_starts, bq, batch, heads)[..., rows] for (q_order, _), (q_starts, _) in zip(orders, starts)]
    counts = [(n_q if q_s is None else q_s.shape[-1] - 1, n_k if kv_s is None else kv_s.shape[-1] - 1) for q_s, kv_s in starts]
    shared = [i for i, (_, kv_order) in enumerate(orders) if kv_order.dim() == 1 and starts[i][1] is None]
    cells = _shared_cells([orders[i][1] for i in shared], bk) if shared else None
    # every other order's key block of each key, by original position: its weights are summed in one scatter
    key_blocks = {i: original_blocks(kv_order, kv_starts, bk, batch, heads)
                  for i, ((_, kv_order), (_, kv_starts)) in enumerate(zip(orders, starts)) if cells is None or i not in shared}
    masses = [torch.zeros(batch * heads, *count, dtype=torch.float32, device=device) for count in counts]
    qf = q.reshape(batch * heads, seq, dim)
    kf = k.float().reshape(batch * heads, seq, dim)
    bias = None if key_bias is None else key_bias.to(device).float().repeat_interleave(heads, 0)[:, None, :]
    chunk_size = chunk_scores(device)
    heads_per_chunk = max(1, min(batch * heads, chunk_size // (MIN_CHUNK_ROWS * seq)))
    rows_per_chunk = max(MIN_CHUNK_ROWS, chunk_size // (heads_per_chunk * seq))
    for h in range(0, batch * heads, heads_per_chunk):
        group = slice(h, h + heads_per_chunk)
        for first in range(0, rows.numel(), rows_per_chunk):
            chunk = slice(first, first + rows_per_chunk)
            scores = torch.bmm(qf[group, rows[chunk]].float() * scale, kf[group].transpose(1, 2))
            if bias is not None:
                scores += bias[group]
            weights = torch.softmax(scores, -1)
            del scores
            groups, count = weights.shape[:2]
            if cells is not None:
                length, cell_of_key, cell_blocks = cells
                per_cell = (weights.view(groups, count, -1, length).sum(-1) if length is not None
                            else _scatter_sums(weights, cell_of_key[None], len(cell_blocks[0])))
            for i in range(len(orders)):
                if i in key_blocks:
                    index = key_blocks[i] if key_blocks[i].shape[0] == 1 else key_blocks[i][group]
                    per_block = _scatter_sums(weights, index, counts[i][1])
                else:
                    per_block = per_cell.new_zeros(groups, count, n_k).index_add_(2, cell_blocks[shared.index(i)], per_cell)
                target = q_blocks[i][..., chunk]
                if target.shape[0] == 1:
                    masses[i][group].index_add_(1, target[0], per_block)
                else:   # each head its own query blocks: one add over the group's rows of blocks
                    n_rows = masses[i].shape[1]
                    rows_of = target[group] + n_rows * torch.arange(groups, device=device)[:, None]
                    masses[i][group].view(groups * n_rows, -1).index_add_(0, rows_of.flatten(), per_block.flatten(0, 1))
    out = []
    for i, blocks in enumerate(q_blocks):
        measured = torch.zeros(blocks.shape[0], counts[i][0], device=device)
        measured.scatter_add_(1, blocks, torch.ones_like(blocks, dtype=torch.float32))
        empty = torch.zeros_like(measured, dtype=torch.bool)
        if starts[i][0] is not None:
            q_sizes = starts[i][0][..., 1:] - starts[i][0][..., :-1]
            empty = (q_sizes == 0).expand(batch, heads, -1).reshape(batch * heads, -1).to(device)
        if bool((measured[~empty.expand_as(measured)] == 0).any()):
            raise ValueError("query_rows must hold at least one query of every query block of every order")
        out.append((masses[i] / measured.clamp(min=1)[:, :, None]).view(batch, heads, *counts[i]))
    return out


def original_blocks(order: torch.Tensor, starts: torch.Tensor | None, block: int, batch: int, heads: int) -> torch.Tensor:
    """The block of each token, by original position: ``[1, S]`` for fixed blocks of an order shared by
    every head, else ``[B*H, S]``; variable blocks are bounded by ``starts`` (``[B|1, H|1, n + 1]``)."""
    position = torch.argsort(order, dim=-1)
    if starts is None:
        return _per_head(position // block, batch, heads)
    seq = order.shape[-1]
    starts = starts.to(order.device).expand(batch, heads, -1).reshape(batch * heads, -1)
    block_of_position = torch.searchsorted(starts[:, 1:].contiguous(), torch.arange(seq, device=order.device).expand(batch * heads, -1).contiguous(), right=True)
    return block_of_position.gather(1, _per_head(position, batch, heads).expand(batch * heads, -1))


def _per_head(order: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """``[1, S]`` for an order shared by every head, ``[B*H, S]`` for per-head orders."""
    return order.view(1, -1) if order.dim() == 1 else order.expand(batch, heads, -1).reshape(batch * heads, -1)


def _scatter_sums(weights: torch.Tensor, key_blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """``[G, R, S]`` weights summed into ``[G, R, n_blocks]`` by ``key_blocks`` (``[G|1, S]``: the
    block of each key)."""
    index = key_blocks[:, None, :].expand_as(weights)
    return weights.new_zeros(*weights.shape[:2], n_blocks).scatter_add_(-1, index, weights)


def _shared_cells(kv_orders: list[torch.Tensor], block: int) -> tuple[int | None, torch.Tensor, list[torch.Tensor]] | None:
    """The cells of keys that share a block in every one of ``kv_orders`` (each ``[S]``): runs of
    keys in the original order, ``(length, cell of each key [S], [key block of each cell per order])``,
    ``length`` their one length (``None`` when they differ); ``None`` when they are too short to save
    work (fewer than two keys on average)."""
    seq = kv_orders[0].shape[0]
    block_of = torch.stack([torch.argsort(order) // block for order in kv_orders])          # [O, S]
    starts = torch.ones(seq, dtype=torch.bool, device=block_of.device)
    starts[1:] = (block_of[:, 1:] != block_of[:, :-1]).any(0)
    positions = torch.nonzero(starts).squeeze(1)
    lengths = torch.diff(positions, append=torch.tensor([seq], device=positions.device))
    if positions.numel() * 2 > seq:
        return None
    length = int(lengths[0]) if bool((lengths == lengths[0]).all()) else None
    return length, starts.long().cumsum(0) - 1, list(block_of[:, positions])

