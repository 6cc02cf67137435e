"""Calibration: how much attention each query block gives each key block, measured once."""

from __future__ import annotations

import torch

from .attention import head_major, resolve_backend
from .layout import TokenLayout


def measure_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    block_size: int | tuple[int, int],
    order: torch.Tensor | None = None,
    kv_order: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-level softmax mass ``[B, H, nQ, nK]`` (fp32, rows sum to 1) of one attention call.

    Args:
        q, k: ``(B, S, H, D)`` as the attention call sees them (after norms and RoPE).
        layout: the call's token layout (text padding is excluded from the keys).
        block_size: tokens per block, or ``(query, key)`` block sizes.
        order: token order (``[S]``, ``[H, S]`` or ``[B, H, S]``) whose blocks are measured;
            ``kv_order`` for the keys, default ``order``.
        backend: ``"auto"``: the Triton kernel on CUDA, the chunked PyTorch version elsewhere.

    Never holds an ``S x S`` matrix.

    Example::

        >>> from dit_sparse import TokenLayout
        >>> layout = TokenLayout((2, 8, 8))
        >>> q, k = torch.randn(1, 128, 2, 16), torch.randn(1, 128, 2, 16)
        >>> measure_block_mass(q, k, layout, 32, order=layout.tile_order((1, 4, 8))).shape
        torch.Size([1, 2, 4, 4])
    """
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    qp = head_major(q, order)
    kp = head_major(k, order if kv_order is None else kv_order)
    valid = layout.key_valid_len(q.shape[0])
    valid = None if valid is None else valid.to(q.device)
    if resolve_backend(backend, q.device) == "triton":
        from dit_sparse.kernels.block_mass_triton import block_mass_triton as block_mass
    else:
        from dit_sparse.kernels.block_mass_torch import block_mass_torch as block_mass
    return block_mass(qp, kp, bq, bk, kv_valid_len=valid)


def measure_block_masses(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    block_size: int | tuple[int, int],
    orders: dict[str, tuple[torch.Tensor, torch.Tensor]],
    backend: str = "auto",
    rows_per_block: int | None = None,
    seed: int = 0,
    starts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`measure_block_mass` over several named ``(q_order, kv_order)`` pairs: on CUDA one
    Triton pass per order; elsewhere one chunked pass over the scores serves every order.

    ``starts``: by the same names, ``(q_starts, kv_starts)`` variable block boundaries
    ``[B|1, H|1, n + 1]`` of orders cut into variable blocks (cluster-aligned ones); those orders
    are measured on the PyTorch path, on any device.

    ``rows_per_block`` (PyTorch path only): measure each query block's mass on a seeded random
    sample of about that many of its queries (see :func:`sample_query_rows`) instead of all of them.

    Example::

        >>> from dit_sparse import TokenLayout
        >>> layout = TokenLayout((2, 8, 8), text_len=5)
        >>> q, k = torch.randn(1, 133, 2, 16), torch.randn(1, 133, 2, 16)
        >>> orders = {"tile": (layout.tile_order((1, 4, 8)),) * 2, "raster": (layout.identity_order(),) * 2}
        >>> masses = measure_block_masses(q, k, layout, 32, orders)
        >>> torch.allclose(masses["raster"], measure_block_mass(q, k, layout, 32, order=layout.identity_order()), atol=1e-6)
        True
    """
    if not orders:
        return {}
    starts = starts or {}
    if resolve_backend(backend, q.device) == "triton":
        measured = {
            name: measure_block_mass(q, k, layout, block_size, order=q_order, kv_order=kv_order, backend=backend)
            for name, (q_order, kv_order) in orders.items() if name not in starts
        }
        variable = {name: pair for name, pair in orders.items() if name in starts}
        return {**measured, **measure_block_masses(q, k, layout, block_size, variable, "torch", rows_per_block, seed, starts)}
    from dit_sparse.kernels.block_mass_torch import block_mass_torch_orders, original_blocks

    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    padding = layout.key_padding(q.shape[0]).to(q.device)
    bias = torch.zeros(padding.shape, device=q.device).masked_fill_(padding, float("-inf")) if padding.any() else None
    pairs = [tuple(o.to(q.device) for o in pair) + starts.get(name, ()) for name, pair in orders.items()]
    batch, heads = q.shape[0], q.shape[2]
    q_blocks = [original_blocks(pair[0], pair[2] if len(pair) == 4 else None, bq, batch, heads) for pair in pairs]
    rows = sample_query_rows(q.shape[1], bq, q_blocks, rows_per_block, seed)
    masses = block_mass_torch_orders(q.transpose(1, 2), k.transpose(1, 2), bq, bk, pairs, bias, query_rows=rows)
    return dict(zip(orders, masses))


def sample_query_rows(
    seq: int, block_size: int, q_blocks: list[torch.Tensor], rows_per_block: int | None, seed: int = 0
) -> torch.Tensor | None:
    """Original positions of the queries a block-mass measurement samples: each query with
    probability ``rows_per_block / block_size`` (seeded), plus every query of any block that the
    draw left empty, in any of ``q_blocks`` (``[..., S]``: the query block of each original
    position, in one order). ``None`` (every query) when ``rows_per_block`` is ``None`` or more than
    a quarter of the block size: a sample is taken only where it cuts the measurement at least
    fourfold.

    Example::

        >>> rows = sample_query_rows(4096, 64, [torch.arange(4096) // 64], 16)
        >>> 0.2 < rows.numel() / 4096 < 0.3
        True
    """
    if rows_per_block is None or 4 * rows_per_block > block_size:
        return None
    device = q_blocks[0].device
    generator = torch.Generator().manual_seed(seed)
    keep = (torch.rand(seq, generator=generator) < rows_per_block / block_size).to(device)
    for blocks in q_blocks:
        blocks = blocks.reshape(-1, seq)
        hits = torch.zeros(blocks.shape[0], int(blocks.max()) + 1, device=device)
        hits.scatter_add_(1, blocks, keep.float().expand_as(blocks))
        keep |= (hits == 0).gather(1, blocks).any(0)
    return torch.nonzero(keep).squeeze(1)
