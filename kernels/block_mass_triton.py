"""Block-mass kernel for calibration, in Triton: how much softmax mass each query block gives each
key block, without ever holding an S x S matrix.

``mass[b, h, i, j]`` is the mean, over the real queries of query block ``i`` (positions < S), of the
softmax probability they put on the keys of key block ``j``; keys past ``kv_valid_len`` get none, so
every row sums to 1 (0 for a query block whose queries have no valid key). One program takes one
query block (or a ``BLOCK_M``-row tile of it) and walks all key tiles in one flat loop: it recomputes
the scores ``q k^T``, turns them into probabilities with the queries' log-sum-exp,
``exp2(s * sm_scale * log2(e) - lse * log2(e))``, and sums them per key block. The log-sum-exp comes from the dense pass, the attention kernel with every
block kept (:func:`block_sparse_attention_triton` with ``return_lse=True``, or without the values,
:func:`block_sparse_lse_triton`, which is what runs here when no lse is given).

Layouts:
    q, k         [B, H, S, D]     fp32, fp16 or bf16, any strides; D <= 256 (padded to a power of two)
    lse          [B, H, S] fp32   natural-log log-sum-exp of the scaled scores over the valid keys
    kv_valid_len [B] int or None  keys at positions >= kv_valid_len[b] get no mass
    mass         [B, H, nQ, nK] fp32

PyTorch twin: ``kernels/block_mass_torch.py``.

Under ``TRITON_INTERPRET=1`` bf16 dot operands are upcast to fp32 (``DOT_FP32``): the interpreter's
bf16 ``tl.dot`` is broken. Compiled runs use bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_attention_triton import block_sparse_lse_triton
from .triton_utils import (
    LOG2E, check_block_size, check_qk, check_valid_len, dot_settings, launch, load_tile, padded_head_dim,
)


@triton.jit
def _key_tiles_mass(
    q, lse2, K, mass_row, lo, hi, kv_len, stride_kn, stride_kd, qk_scale, inv_rows,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    MASK_KEYS: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Mass of the query tile on key tiles ``lo .. hi`` (whole key blocks of ``BLOCK_K // BLOCK_N``
    tiles), written to ``mass_row`` once per key block (added when ``ACCUMULATE``)."""
    KV_SPLIT: tl.constexpr = BLOCK_K // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_mass = tl.zeros([q.shape[0]], dtype=tl.float32)
    for t in range(lo, hi):
        cols = t * BLOCK_N + offs_n
        k = load_tile(K, cols, offs_d, stride_kn, stride_kd, kv_len, HEAD_DIM, MASK_KEYS)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASK_KEYS:
            p = tl.where(cols[None, :] < kv_len, p, 0.0)
        row_mass += tl.sum(p, 1)
        block_done = t % KV_SPLIT == KV_SPLIT - 1
        mass = tl.sum(row_mass, 0) * inv_rows
        if ACCUMULATE:
            tl.atomic_add(mass_row + t // KV_SPLIT, mass, mask=block_done)
        else:
            tl.store(mass_row + t // KV_SPLIT, mass, mask=block_done)
        row_mass = tl.where(block_done, 0.0, row_mass)


@triton.jit
def _block_mass_fwd(
    Q, K, Lse, Mass, KV_valid_len,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    H, S, N_Q, N_K, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_VALID_LEN: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    Q_SPLIT: tl.constexpr = BLOCK_Q // BLOCK_M
    KV_SPLIT: tl.constexpr = BLOCK_K // BLOCK_N
    q_block = tl.program_id(0) // Q_SPLIT
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv_len = S
    if HAS_VALID_LEN:
        kv_len = tl.maximum(tl.minimum(tl.load(KV_valid_len + b), S), 0)

    rows = q_block * BLOCK_Q + (tl.program_id(0) % Q_SPLIT) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = load_tile(q_base, rows, offs_d, stride_qs, stride_qd, S, HEAD_DIM, True)
    if DOT_FP32:
        q = q.to(tl.float32)
    # Padded query rows and rows without any valid key (lse = -inf) get lse = +inf: no mass.
    lse2 = tl.load(Lse + bh.to(tl.int64) * S + rows, mask=rows < S, other=float("inf")) * LOG2E
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    inv_rows = 1.0 / tl.minimum(S - q_block * BLOCK_Q, BLOCK_Q).to(tl.float32)

    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    mass_row = Mass + (bh.to(tl.int64) * N_Q + q_block) * N_K
    # Key blocks wholly inside the valid keys run unmasked, the one holding their end masked; the
    # rest keep the zeros they start with.
    full_tiles = kv_len // BLOCK_K * KV_SPLIT
    _key_tiles_mass(
        q, lse2, k_base, mass_row, 0, full_tiles, kv_len, stride_ks, stride_kd, qk_scale, inv_rows,
        BLOCK_K, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, Q_SPLIT > 1, DOT_FP32, DOT_PRECISION,
    )
    _key_tiles_mass(
        q, lse2, k_base, mass_row, full_tiles, tl.cdiv(kv_len, BLOCK_K) * KV_SPLIT, kv_len,
        stride_ks, stride_kd, qk_scale, inv_rows,
        BLOCK_K, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, Q_SPLIT > 1, DOT_FP32, DOT_PRECISION,
    )


def mass_tile_config(block_size_q: int, block_size_k: int, head_dim_pad: int, dtype: torch.dtype) -> dict:
    """``BLOCK_M``, ``BLOCK_N``, ``num_warps`` and ``num_stages`` of the block-mass kernel.

    A query tile holds at most 64 KiB (128 rows of 16-bit D <= 256), so that the tile and the pipelined
    key tiles fit in shared memory; a larger query block is split over programs whose masses add up.
    """
    itemsize = torch.finfo(dtype).bits // 8
    block_m = min(block_size_q, 128, (64 << 10) // (head_dim_pad * itemsize))
    block_n = min(block_size_k, 64 if itemsize == 2 and head_dim_pad <= 128 else 32)
    return {
        "BLOCK_M": block_m, "BLOCK_N": block_n,
        "num_warps": 8 if block_m * head_dim_pad >= 128 * 128 else 4, "num_stages": 3 if itemsize == 2 else 2,
    }


def block_mass_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size_q: int,
    block_size_k: int,
    lse: torch.Tensor | None = None,
    kv_valid_len: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Mean softmax mass each query block gives each key block, ``[B, H, nQ, nK]`` fp32.

    Block sizes are powers of two >= 16. ``lse`` must come from the same ``q``, ``k``, ``scale`` and
    valid lengths; when ``None`` the dense pass computes it (one dense attention more).

    Example::

        >>> q = k = torch.randn(1, 2, 1000, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> mass = block_mass_triton(q, k, 64, 64)  # doctest: +SKIP
        >>> mass.shape, bool(torch.allclose(mass.sum(-1), torch.ones(1, 2, 16, device="cuda")))  # doctest: +SKIP
        (torch.Size([1, 2, 16, 16]), True)
    """
    batch, heads, seq, dim = check_qk(q, k)
    check_block_size("block_size_q", block_size_q)
    check_block_size("block_size_k", block_size_k)
    n_q, n_k = triton.cdiv(seq, block_size_q), triton.cdiv(seq, block_size_k)
    valid = check_valid_len(kv_valid_len, batch, q.device)
    if lse is None:
        lse = _dense_lse(q, k, block_size_q, block_size_k, valid, scale)
    if lse.shape != (batch, heads, seq):
        raise ValueError(f"lse must be [B, H, S] = {(batch, heads, seq)}, got {tuple(lse.shape)}")
    lse = lse.to(device=q.device, dtype=torch.float32).contiguous()

    head_dim_pad = padded_head_dim(dim)
    sm_scale = dim**-0.5 if scale is None else scale
    mass = torch.zeros(batch, heads, n_q, n_k, dtype=torch.float32, device=q.device)
    launch(
        _block_mass_fwd, lambda c: (n_q * (block_size_q // c["BLOCK_M"]), batch * heads),
        mass_tile_config(block_size_q, block_size_k, head_dim_pad, q.dtype),
        ("block_mass", q.device, q.dtype, dim, block_size_q, block_size_k),
        q, k, lse, mass, valid, *q.stride(), *k.stride(), heads, seq, n_q, n_k, sm_scale * LOG2E.value,
        BLOCK_Q=block_size_q, BLOCK_K=block_size_k, HEAD_DIM=dim, HEAD_DIM_PAD=head_dim_pad,
        HAS_VALID_LEN=valid is not None, **dot_settings(q.dtype),
    )
    return mass


def _dense_lse(q, k, block_size_q, block_size_k, valid, scale) -> torch.Tensor:
    """The log-sum-exp of the dense pass: every query block keeps every key block (one shared row of
    indices)."""
    heads, seq = q.shape[1], q.shape[2]
    n_q, n_k = triton.cdiv(seq, block_size_q), triton.cdiv(seq, block_size_k)
    counts = torch.full((1, heads, n_q), n_k, dtype=torch.int32, device=q.device)
    offsets = torch.zeros(1, heads, n_q, dtype=torch.int64, device=q.device)
    indices = torch.arange(n_k, dtype=torch.int32, device=q.device)
    return block_sparse_lse_triton(
        q, k, counts, offsets, indices, block_size_q, block_size_k, kv_valid_len=valid, scale=scale
    )
