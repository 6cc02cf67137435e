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
    limit = torch.full((batch,), seq, device=q.device) if kv_valid_len is None else kv_valid_len.to(q.device)
    key_bias = torch.zeros(batch, n_k * bk, device=q.device)
    key_bias.masked_fill_(torch.arange(n_k * bk, device=q.device)[None, :] >= limit.clamp(max=seq)[:, None], float("-inf"))
    real_query = (torch.arange(n_q * bq, device=q.device) < seq).float().view(n_q, bq, 1)
    queries_per_block = real_query.sum((1, 2))

    qf = _pad_rows(q.float(), n_q * bq).view(batch * heads, n_q * bq, dim)
    kf = _pad_rows(k.float(), n_k * bk).view(batch * heads, n_k * bk, dim)
    lse_f = None if lse is None else _pad_rows(lse.float().unsqueeze(-1), n_q * bq).view(batch * heads, n_q * bq)
    bias = key_bias.repeat_interleave(heads, 0)[:, None, :]
    mass = torch.empty(batch * heads, n_q, n_k, dtype=torch.float32, device=q.device)
    blocks_per_chunk = max(1, CHUNK_SCORES // (batch * heads * bq * n_k * bk))
    for first in range(0, n_q, blocks_per_chunk):
        last = min(n_q, first + blocks_per_chunk)
        rows = slice(first * bq, last * bq)
        scores = torch.baddbmm(bias, qf[:, rows], kf.transpose(1, 2), alpha=scale)
        if lse_f is None:
            probs = scores.softmax(-1)
        else:
            probs = scores.sub_(lse_f[:, rows, None]).exp_()
        per_block = probs.view(batch * heads, last - first, bq, n_k, bk).sum(-1)
        mass[:, first:last] = (per_block * real_query[first:last]).sum(2)
    return (mass / queries_per_block[:, None]).view(batch, heads, n_q, n_k)


def _pad_rows(x: torch.Tensor, length: int) -> torch.Tensor:
    return x if x.shape[2] == length else torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[2]))
