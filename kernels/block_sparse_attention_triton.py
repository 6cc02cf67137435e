"""Block-sparse flash attention forward in Triton.

One program computes a tile of ``BLOCK_M`` queries of one query block and walks that block's row of
the plan (its sorted list of key blocks) in one flat loop over ``BLOCK_N``-key tiles, with an online
softmax in fp32: ``exp2`` of the scores times one folded scale ``sm_scale * log2(e)``. Key blocks that
lie wholly inside the valid keys run unmasked; the one block that straddles the end of the valid keys
(a partial last block or text padding) runs masked; blocks past it are skipped. Programs take rows
in ``row_order``, longest rows first by default, so that short rows fill the tail of the launch.

Layouts (the sequence already in the plan's token order):
    q, k, v      [B, H, S, D]    fp32, fp16 or bf16, any strides; D <= 256 (padded to a power of two)
    kv_counts    [Bp, H, nQ] int  number of key blocks of each query block (Bp = B, or 1: shared)
    kv_offsets   [Bp, H, nQ] int  where each row starts in kv_indices
    kv_indices   [nnz] int        sorted key block indices of every row
    kv_valid_len [B] int or None  keys at positions >= kv_valid_len[b] are masked out
    row_order    [B * H * nQ] int flat rows (b * H + h) * nQ + i, in the order programs take them
    q_starts     [Bp|1, H|1, nQ+1] int or None  variable query blocks: block i holds positions
                 q_starts[i] .. q_starts[i+1]-1 (at most BLOCK_Q); None: fixed blocks
    kv_starts    [Bp|1, H|1, nK+1] int or None  the same for the key blocks (at most BLOCK_K each)
    out          [B, H, S, D]     in q's dtype; query blocks with no valid key give zeros
    lse          [B, H, S] fp32   natural-log log-sum-exp of the scaled scores (-inf: no key)

With variable blocks (``VARIABLE_BLOCKS``) a program's query tile ends at its block's end and the
row's key blocks are walked block by block, each in ``BLOCK_N`` tiles up to its own end, masked.

PyTorch twin: ``kernels/block_sparse_attention_torch.py`` (same contract, without the lse).

Under ``TRITON_INTERPRET=1`` bf16 dot operands are upcast to fp32 (``DOT_FP32``, see
``triton_utils.dot_settings``): the interpreter's bf16 ``tl.dot`` is broken. Compiled runs use bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import (
    LN2, LOG2E, check_block_size, check_qk, check_valid_len, dot_settings, launch, load_tile, padded_head_dim,
)


@triton.jit
def _attend_key_tiles(
    acc, l_i, m_i, q,
    K, V, row_indices, lo, hi, kv_len,
    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    MASK_KEYS: tl.constexpr, WITH_VALUES: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key tiles ``lo .. hi`` of a row; tile ``t`` is part ``t % KV_SPLIT`` of the
    row's key block ``t // KV_SPLIT``. Without ``WITH_VALUES`` only the running max and sum advance."""
    KV_SPLIT: tl.constexpr = BLOCK_K // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    for t in range(lo, hi):
        block = tl.load(row_indices + t // KV_SPLIT)
        cols = block * BLOCK_K + (t % KV_SPLIT) * BLOCK_N + offs_n
        k = load_tile(K, cols, offs_d, stride_kn, stride_kd, kv_len, HEAD_DIM, MASK_KEYS)
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASK_KEYS:
            qk = tl.where(cols[None, :] < kv_len, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_VALUES:
            v = load_tile(V, cols, offs_d, stride_vn, stride_vd, kv_len, HEAD_DIM, MASK_KEYS)
            if DOT_FP32:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attend_variable_blocks(
    acc, l_i, m_i, q,
    K, V, row_indices, count, k_bounds, kv_len,
    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    WITH_VALUES: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over a row's ``count`` key blocks of variable size: block ``c`` holds the
    keys ``k_bounds[c] .. k_bounds[c + 1] - 1`` (those before ``kv_len``), walked in masked tiles."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    for i in range(0, count):
        block = tl.load(row_indices + i)
        lo = tl.load(k_bounds + block)
        hi = tl.minimum(tl.load(k_bounds + block + 1), kv_len)
        for start in range(lo, hi, BLOCK_N):
            cols = start + offs_n
            k = load_tile(K, cols, offs_d, stride_kn, stride_kd, hi, HEAD_DIM, True)
            if DOT_FP32:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            qk = tl.where(cols[None, :] < hi, qk, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            if WITH_VALUES:
                v = load_tile(V, cols, offs_d, stride_vn, stride_vd, hi, HEAD_DIM, True)
                if DOT_FP32:
                    v = v.to(tl.float32)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _block_sparse_attention_fwd(
    Q, K, V, Out, Lse,
    KV_counts, KV_offsets, KV_indices, KV_valid_len, Row_order, Q_starts, KV_starts,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_plan_b, stride_q_starts_b, stride_q_starts_h, stride_kv_starts_b, stride_kv_starts_h,
    H, S, N_Q, N_K, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_VALID_LEN: tl.constexpr,
    WITH_VALUES: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARIABLE_BLOCKS: tl.constexpr,
):
    Q_SPLIT: tl.constexpr = BLOCK_Q // BLOCK_M
    KV_SPLIT: tl.constexpr = BLOCK_K // BLOCK_N
    pid = tl.program_id(0)
    row = tl.load(Row_order + pid // Q_SPLIT)
    q_block = row % N_Q
    bh = row // N_Q
    b = bh // H
    h = bh % H

    plan_row = b * stride_plan_b + h * N_Q + q_block
    count = tl.load(KV_counts + plan_row)
    row_indices = KV_indices + tl.load(KV_offsets + plan_row)
    kv_len = S
    if HAS_VALID_LEN:
        kv_len = tl.maximum(tl.minimum(tl.load(KV_valid_len + b), S), 0)

    if VARIABLE_BLOCKS:
        q_bounds = Q_starts + b * stride_q_starts_b + h * stride_q_starts_h + q_block
        q_lo = tl.load(q_bounds)
        q_hi = tl.load(q_bounds + 1)
    else:
        q_lo = q_block * BLOCK_Q
        q_hi = tl.minimum(q_lo + BLOCK_Q, S)

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = q_lo + (pid % Q_SPLIT) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q = load_tile(Q + b64 * stride_qb + h64 * stride_qh, rows, offs_d, stride_qs, stride_qd, q_hi, HEAD_DIM, True)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V
    if WITH_VALUES:
        v_base = V + b64 * stride_vb + h64 * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if VARIABLE_BLOCKS:
        k_bounds = KV_starts + b * stride_kv_starts_b + h * stride_kv_starts_h
        count = tl.where(q_lo + (pid % Q_SPLIT) * BLOCK_M < q_hi, count, 0)   # a tile past its block's end
        acc, l_i, m_i = _attend_variable_blocks(
            acc, l_i, m_i, q, k_base, v_base, row_indices, count, k_bounds, kv_len,
            stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
            BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, WITH_VALUES, DOT_FP32, DOT_PRECISION,
        )
    else:
        # Rows are sorted, so the blocks that reach past the last whole block of valid keys form the
        # row's tail: of those, only one (the block holding the end of the valid keys) has any key.
        full_blocks = kv_len // BLOCK_K
        n_tail = tl.zeros([], dtype=tl.int32)
        for t in range(0, tl.minimum(count, N_K - full_blocks)):
            n_tail += (tl.load(row_indices + count - 1 - t) >= full_blocks).to(tl.int32)
        n_full = count - n_tail
        first_tail = tl.load(row_indices + n_full, mask=n_tail > 0, other=-1)
        n_partial = ((first_tail == full_blocks) & (kv_len % BLOCK_K != 0)).to(tl.int32)
        acc, l_i, m_i = _attend_key_tiles(
            acc, l_i, m_i, q, k_base, v_base, row_indices, 0, n_full * KV_SPLIT, kv_len,
            stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
            BLOCK_K, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, WITH_VALUES, DOT_FP32, DOT_PRECISION,
        )
        acc, l_i, m_i = _attend_key_tiles(
            acc, l_i, m_i, q, k_base, v_base, row_indices, n_full * KV_SPLIT, (n_full + n_partial) * KV_SPLIT, kv_len,
            stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
            BLOCK_K, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, WITH_VALUES, DOT_FP32, DOT_PRECISION,
        )

    has_key = l_i > 0.0
    if WITH_VALUES:
        acc = acc / tl.where(has_key, l_i, 1.0)[:, None]
        out_ptrs = Out + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_os + offs_d[None, :] * stride_od
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(rows[:, None] < q_hi) & (offs_d[None, :] < HEAD_DIM))
    if RETURN_LSE:
        lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(Lse + bh.to(tl.int64) * S + rows, lse, mask=rows < q_hi)


def heavy_first_row_order(kv_counts: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Flat rows ``(b * H + h) * nQ + i`` of a ``[B, H, nQ]`` plan, most key blocks first (ties keep
    their order, so a dense plan runs in natural order). ``int32 [B * H * nQ]``; cache it per plan.

    Example::

        >>> heavy_first_row_order(torch.tensor([[[1, 3, 2]]]), 2).tolist()
        [1, 4, 2, 5, 0, 3]
    """
    counts = kv_counts.expand(batch_size, -1, -1).reshape(-1)
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


def tile_config(block_size_q: int, block_size_k: int, head_dim_pad: int, dtype: torch.dtype) -> dict:
    """``BLOCK_M``, ``BLOCK_N``, ``num_warps`` and ``num_stages`` for a plan's block sizes and head dim.

    Tiles are at most the plan's blocks (a larger block is split into several tiles). 16-bit inputs
    take 128 x 64 tiles up to D = 128 (8 warps from D = 64 on) and 64 x 32 tiles with 8 warps at
    D = 256, sizes chosen so that the sm_90 build neither spills nor runs out of registers. fp32 is
    the exact path, not a fast one: smaller tiles, and its 3xTF32 dots still spill a little at D >= 128.
    """
    if dtype == torch.float32:
        block_m, block_n, warps, stages = (64, 32, 4, 2) if head_dim_pad <= 128 else (32, 16, 4, 2)
    elif head_dim_pad <= 32:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    elif head_dim_pad <= 128:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        block_m, block_n, warps, stages = 64, 32, 8, 2
    return {
        "BLOCK_M": min(block_m, block_size_q), "BLOCK_N": min(block_n, block_size_k),
        "num_warps": warps, "num_stages": stages,
    }


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_offsets: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size_q: int,
    block_size_k: int,
    kv_valid_len: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    row_order: torch.Tensor | None = None,
    q_starts: torch.Tensor | None = None,
    kv_starts: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse softmax attention; query blocks with no (valid) key give zeros.

    Block sizes are powers of two >= 16. ``row_order`` defaults to :func:`heavy_first_row_order`.
    ``q_starts`` / ``kv_starts``: variable block boundaries (see the module docstring).
    Returns ``out [B, H, S, D]`` in ``q``'s dtype, and ``lse [B, H, S]`` fp32 if ``return_lse``.

    Example::

        >>> q = k = v = torch.randn(1, 1, 100, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> counts = torch.tensor([[[1, 2]]]); offsets = torch.tensor([[[0, 1]]])  # doctest: +SKIP
        >>> out, lse = block_sparse_attention_triton(  # doctest: +SKIP
        ...     q, k, v, counts.cuda(), offsets.cuda(), torch.tensor([0, 0, 1]).cuda(), 64, 64, return_lse=True)
        >>> out.shape, lse.shape  # doctest: +SKIP
        (torch.Size([1, 1, 100, 64]), torch.Size([1, 1, 100]))
    """
    check_qk(q, k, v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    _attention_fwd(q, k, v, out, lse, kv_counts, kv_offsets, kv_indices, block_size_q, block_size_k,
                   kv_valid_len, scale, row_order, q_starts, kv_starts)
    return (out, lse) if return_lse else out


def block_sparse_lse_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_offsets: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size_q: int,
    block_size_k: int,
    kv_valid_len: torch.Tensor | None = None,
    scale: float | None = None,
    row_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Only the ``lse [B, H, S]`` of :func:`block_sparse_attention_triton` (the same kernel without
    the values: about half its work), e.g. the dense pass of block-mass calibration."""
    check_qk(q, k)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    _attention_fwd(q, k, None, None, lse, kv_counts, kv_offsets, kv_indices, block_size_q, block_size_k,
                   kv_valid_len, scale, row_order, None, None)
    return lse


def _attention_fwd(q, k, v, out, lse, kv_counts, kv_offsets, kv_indices, block_size_q, block_size_k,
                   kv_valid_len, scale, row_order, q_starts, kv_starts) -> None:
    """Check the plan arguments and launch the kernel; ``v``/``out`` and ``lse`` may be ``None``."""
    batch, heads, seq, dim = q.shape
    check_block_size("block_size_q", block_size_q)
    check_block_size("block_size_k", block_size_k)
    n_q = triton.cdiv(seq, block_size_q) if q_starts is None else q_starts.shape[-1] - 1
    n_k = triton.cdiv(seq, block_size_k) if kv_starts is None else kv_starts.shape[-1] - 1
    variable = q_starts is not None or kv_starts is not None
    starts = [_block_bounds(x, seq, block, n, device=q.device) if variable else None
              for x, block, n in ((q_starts, block_size_q, n_q), (kv_starts, block_size_k, n_k))]
    if kv_counts.dim() != 3 or kv_counts.shape[0] not in (1, batch) or kv_counts.shape[1:] != (heads, n_q):
        raise ValueError(
            f"kv_counts must be [1 or {batch}, {heads}, {n_q}] for S={seq} in query blocks of {block_size_q}, "
            f"got {tuple(kv_counts.shape)}"
        )
    if kv_offsets.shape != kv_counts.shape:
        raise ValueError(f"kv_offsets must be shaped like kv_counts {tuple(kv_counts.shape)}, got {tuple(kv_offsets.shape)}")
    if scale is not None and not scale > 0:
        raise ValueError(f"the softmax scale must be positive, got {scale}")
    if row_order is None:
        row_order = heavy_first_row_order(kv_counts, batch)
    if row_order.numel() != batch * heads * n_q:
        raise ValueError(f"row_order must hold the {batch * heads * n_q} rows of [B, H, nQ], got {row_order.numel()}")
    device = q.device
    counts = kv_counts.to(device=device, dtype=torch.int32).contiguous()
    offsets = kv_offsets.to(device=device, dtype=torch.int64).contiguous()
    indices = kv_indices.to(device=device, dtype=torch.int32).contiguous()
    valid = check_valid_len(kv_valid_len, batch, device)
    row_order = row_order.to(device=device, dtype=torch.int32).contiguous()

    head_dim_pad = padded_head_dim(dim)
    sm_scale = dim**-0.5 if scale is None else scale
    no_strides = (0, 0, 0, 0)
    launch(
        _block_sparse_attention_fwd, lambda c: (row_order.numel() * (block_size_q // c["BLOCK_M"]),),
        tile_config(block_size_q, block_size_k, head_dim_pad, q.dtype),
        ("attention", device, q.dtype, dim, block_size_q, block_size_k),
        q, k, v, out, lse, counts, offsets, indices, valid, row_order, *starts,
        *q.stride(), *k.stride(), *(no_strides if v is None else v.stride()), *(no_strides if out is None else out.stride()),
        0 if counts.shape[0] == 1 else heads * n_q,
        *_starts_strides(starts),
        heads, seq, n_q, n_k, sm_scale * LOG2E.value,
        BLOCK_Q=block_size_q, BLOCK_K=block_size_k, HEAD_DIM=dim, HEAD_DIM_PAD=head_dim_pad,
        HAS_VALID_LEN=valid is not None, WITH_VALUES=out is not None, RETURN_LSE=lse is not None,
        VARIABLE_BLOCKS=variable, **dot_settings(q.dtype),
    )


def _block_bounds(starts: torch.Tensor | None, seq: int, block: int, n: int, device: torch.device) -> torch.Tensor:
    """``[Bp|1, H|1, n + 1]`` int32 block boundaries on ``device`` (those of fixed blocks for ``None``)."""
    if starts is None:
        return torch.clamp(torch.arange(n + 1, device=device) * block, max=seq).to(torch.int32).view(1, 1, -1)
    while starts.dim() < 3:
        starts = starts.unsqueeze(0)
    return starts.to(device=device, dtype=torch.int32).contiguous()


def _starts_strides(starts: list[torch.Tensor | None]) -> tuple[int, ...]:
    """Batch and head strides of the query and key boundaries (0 where shared, or absent)."""
    strides = []
    for bounds in starts:
        if bounds is None:
            strides += [0, 0]
        else:
            strides += [0 if bounds.shape[0] == 1 else bounds.stride(0), 0 if bounds.shape[1] == 1 else bounds.stride(1)]
    return tuple(strides)
