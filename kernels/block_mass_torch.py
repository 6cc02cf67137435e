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
    heads_per_chunk = max(1, min(batch * heads, CHUNK_SCORES // (bq * n_k * bk)))
    blocks_per_chunk = max(1, CHUNK_SCORES // (heads_per_chunk * bq * n_k * bk))
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
) -> list[torch.Tensor]:
    """:func:`block_mass_torch` over several token orders from one pass over the scores.

    The scores of a query and a key do not depend on the order the blocks are cut from, so each
    chunk's ``exp(QK^T - max)`` is computed once, in the original order, and summed into every
    order's key blocks (columns gathered into the order) and query blocks.

    Args:
        q, k: ``[B, H, S, D]`` in the original token order.
        orders: ``(q_order, kv_order)`` pairs, each ``[S]`` (shared by every head) or ``[B, H, S]``
            (``order[..., p]`` is the original position of the token at permuted position ``p``).
        key_bias: ``[B, S]`` added to the scores, in the original order (``-inf`` for padding).

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
    per_head = [tuple(o.reshape((1,) * (3 - o.dim()) + tuple(o.shape)).expand(batch, heads, seq) for o in pair) for pair in orders]
    q_block = [(torch.argsort(q_order, dim=-1) // bq) for q_order, _ in per_head]        # [B, H, S] block of each query
    masses = [torch.zeros(batch, heads, n_q, n_k, dtype=torch.float32, device=q.device) for _ in orders]
    rows_per_chunk = max(1, CHUNK_SCORES // seq)
    for b in range(batch):
        for h in range(heads):
            kf = k[b, h].float()
            for first in range(0, seq, rows_per_chunk):
                rows = slice(first, min(seq, first + rows_per_chunk))
                scores = (q[b, h, rows].float() * scale) @ kf.T
                if key_bias is not None:
                    scores += key_bias[b]
                weights = (scores - scores.amax(-1, keepdim=True)).exp_()
                weights /= weights.sum(-1, keepdim=True)
                for i, (_, kv_order) in enumerate(per_head):
                    gathered = _pad_last(weights.index_select(-1, kv_order[b, h]), n_k * bk)
                    per_block = gathered.view(-1, n_k, bk).sum(-1)                              # [R, nK]
                    masses[i][b, h].index_add_(0, q_block[i][b, h, rows], per_block)
    queries_per_block = torch.clamp(seq - torch.arange(n_q, device=q.device) * bq, max=bq).float()
    return [m / queries_per_block[:, None] for m in masses]


def _pad_last(x: torch.Tensor, length: int) -> torch.Tensor:
    return x if x.shape[-1] == length else torch.nn.functional.pad(x, (0, length - x.shape[-1]))
