"""The attention op: gather into the plan's token orders, run a block-sparse backend, scatter back."""

from __future__ import annotations

import functools

import torch

from .config import BACKENDS
from .plan import BlockSparsePlan


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention over ``plan``, in diffusers' ``(B, S, H, D)`` layout.

    Args:
        q, k, v: ``(B, S, H, D)`` in the original token order (fp32, fp16 or bf16).
        plan: a :class:`BlockSparsePlan` for ``S`` tokens and ``H`` heads, of batch size 1 or B.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"torch"``, ``"triton"``,
            ``"flex"`` (FlexAttention) or ``"torch_reference"`` (dense masked SDPA, for tests).
        scale: softmax scale, default ``D ** -0.5``.

    Returns ``(B, S, H, D)``; query blocks that attend no key give zeros.

    Example::

        >>> from dit_sparse import BlockSparsePlan, TokenLayout
        >>> layout = TokenLayout(grid=(2, 8, 8))
        >>> mask = torch.ones(2, 2, 2, dtype=torch.bool)
        >>> plan = BlockSparsePlan.from_block_mask(mask, layout, 64)
        >>> q = k = v = torch.randn(1, 128, 2, 16)
        >>> sparse_attention(q, k, v, plan).shape
        torch.Size([1, 128, 2, 16])
    """
    batch, seq, heads, _ = _check_inputs(q, k, v, plan)
    name = resolve_backend(backend, q.device)
    plan = plan.to(q.device)
    if name == "torch_reference":
        from dit_sparse.kernels.masked_attention_reference import masked_attention_reference

        out = masked_attention_reference(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan.to_token_mask(batch), scale
        )
        return out.transpose(1, 2)

    if name == "torch":  # the token gathers run inside the kernel
        return _torch_kernel(q, k, v, plan, _valid_len(plan, batch, q.device), scale, token_order=True)
    qp = _to_plan_order(q, plan, "q")
    kp = _to_plan_order(k, plan, "kv")
    vp = _to_plan_order(v, plan, "kv")
    return _from_plan_order(attention_in_plan_order(qp, kp, vp, plan, name, scale), plan)


def attention_in_plan_order(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """The block-sparse kernel alone: what :func:`sparse_attention` runs between its token gathers.

    Args:
        q, k, v: ``[B, H, S, D]``, already gathered into the plan's query and key orders.
        plan, scale: as for :func:`sparse_attention`.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"flex"``.

    Returns ``[B, H, S, D]`` in the plan's query order.
    """
    name = resolve_backend(backend, q.device)
    if name not in _KERNELS:
        raise ValueError(f"backend {name!r} works in the original token order; use sparse_attention")
    plan = plan.to(q.device)
    return _KERNELS[name](q, k, v, plan, _valid_len(plan, q.shape[0], q.device), scale)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` means on ``device``; an error if it cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton" and not _triton_available():
        raise RuntimeError(
            "backend='triton' needs the triton package (Linux): pip install 'dit-sparse[gpu]' (CUDA builds of torch "
            "bring it), or use backend='torch'"
        )
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_inputs(q, k, v, plan: BlockSparsePlan) -> tuple[int, int, int, int]:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k and v must share one (B, S, H, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, seq, heads, dim = q.shape
    if seq != plan.layout.seq_len:
        raise ValueError(
            f"the plan is for {plan.layout.seq_len} tokens (grid {plan.layout.grid} + {plan.layout.text_len} "
            f"text) but q has {seq}; build a plan for this layout"
        )
    if heads != plan.num_heads:
        raise ValueError(f"the plan has {plan.num_heads} heads but q has {heads}")
    if plan.batch_size not in (1, batch):
        raise ValueError(f"the plan is for batch size {plan.batch_size} but q has {batch}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"sparse_attention supports fp32, fp16 and bf16, got {q.dtype}")
    return batch, seq, heads, dim


def head_major(x: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, S, H, D)`` to ``[B, H, S, D]``, gathering each head's tokens into ``order``
    (``[S]``, ``[H, S]`` or ``[B, H, S]``; ``None`` keeps the original order)."""
    if order is None:
        return x.transpose(1, 2).contiguous()
    batch, seq, heads, _ = x.shape
    order = order.reshape((1,) * (3 - order.dim()) + tuple(order.shape)).expand(batch, heads, seq)
    return _gather(x, _gather_index(order))


def _gather_index(order: torch.Tensor) -> torch.Tensor:
    """Rows of ``x.reshape(B*S*H, D)`` that make up ``[B, H, S]`` in ``order``."""
    batch, heads, seq = order.shape
    b = torch.arange(batch, device=order.device)[:, None, None]
    h = torch.arange(heads, device=order.device)[None, :, None]
    return ((b * seq + order) * heads + h).reshape(-1)


def _scatter_index(inverse: torch.Tensor) -> torch.Tensor:
    """Rows of a permuted ``[B*H*S, D]`` output that make up ``(B, S, H)`` in original order."""
    batch, heads, seq = inverse.shape
    b = torch.arange(batch, device=inverse.device)[:, None, None]
    h = torch.arange(heads, device=inverse.device)[None, :, None]
    return ((b * heads + h) * seq + inverse).permute(0, 2, 1).reshape(-1)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    batch, seq, heads, dim = x.shape
    return x.reshape(-1, dim).index_select(0, index).view(batch, heads, seq, dim)


def _valid_len(plan: BlockSparsePlan, batch: int, device: torch.device) -> torch.Tensor | None:
    valid = plan.layout.key_valid_len(batch)
    return None if valid is None else valid.to(device)


def _token_rows(plan: BlockSparsePlan, which: str, batch: int) -> torch.Tensor:
    """``[B, H, S]``: the row of a ``(B, S, H, D)`` tensor's ``reshape(-1, D)`` that holds each
    position of each head's query (``"q"``) or key (``"kv"``) order."""
    return _gather_index(plan.order(which, batch)).view(batch, plan.num_heads, -1)


def _to_plan_order(x: torch.Tensor, plan: BlockSparsePlan, which: str) -> torch.Tensor:
    batch = x.shape[0]
    if getattr(plan, f"{which}_order") is None:
        return head_major(x)
    index = plan.cached(("gather", which, batch), lambda: _gather_index(plan.order(which, batch)))
    return _gather(x, index)


def _from_plan_order(out: torch.Tensor, plan: BlockSparsePlan) -> torch.Tensor:
    batch, heads, seq, dim = out.shape
    if plan.q_order is None:
        return out.transpose(1, 2)
    index = plan.cached(("scatter", batch), lambda: _scatter_index(plan.inverse_order("q", batch)))
    return out.reshape(-1, dim).index_select(0, index).view(batch, seq, heads, dim)


def _plan_rows(plan: BlockSparsePlan) -> tuple:
    """The plan's compressed rows, as the kernels take them."""
    return plan.kv_counts, plan.kv_offsets, plan.kv_indices, plan.block_size_q, plan.block_size_k


def _plan_starts(plan: BlockSparsePlan) -> dict:
    """The plan's variable block boundaries (``None`` for fixed blocks), as the kernels take them."""
    return {"q_starts": plan.q_starts, "kv_starts": plan.kv_starts}


def _torch_kernel(q, k, v, plan: BlockSparsePlan, valid, scale, token_order: bool = False):
    """The ``torch`` backend on ``[B, H, S, D]`` tensors in plan order or, with ``token_order``, on
    ``(B, S, H, D)`` tensors in the original order (the kernel gathers them); its schedule is worked
    out once per plan, batch size and head dim."""
    from dit_sparse.kernels.block_sparse_attention_torch import block_sparse_attention_torch, torch_schedule

    batch, dim = q.shape[0], q.shape[-1]

    def schedule():
        rows = (_token_rows(plan, "q", batch), _token_rows(plan, "kv", batch)) if token_order else (None, None)
        shape = (batch, plan.num_heads, plan.layout.seq_len)
        return torch_schedule(*_plan_rows(plan), shape, dim, valid, *rows, **_plan_starts(plan))

    schedule = plan.cached(("valid", "torch_schedule", batch, dim, token_order), schedule)
    return block_sparse_attention_torch(q, k, v, *_plan_rows(plan), scale=scale, schedule=schedule)


def _triton_kernel(q, k, v, plan: BlockSparsePlan, valid, scale):
    from dit_sparse.kernels.block_sparse_attention_triton import (
        block_sparse_attention_triton,
        heavy_first_row_order,
    )

    batch = q.shape[0]
    rows = plan.cached(("row_order", batch), lambda: heavy_first_row_order(plan.kv_counts, batch))
    return block_sparse_attention_triton(
        q, k, v, *_plan_rows(plan), kv_valid_len=valid, scale=scale, row_order=rows, **_plan_starts(plan)
    )


def _flex_kernel(q, k, v, plan: BlockSparsePlan, valid, scale):
    """FlexAttention with the plan's ``BlockMask`` (which carries the valid key lengths itself);
    rows with no key come out as zeros. Compiled on CUDA, and on CPU once eager FlexAttention would
    hold more than ``FLEX_EAGER_SCORE_BYTES`` of scores. Compiled FlexAttention on CUDA needs tiles
    that divide the mask's blocks: blocks under its default 128 get tiles of their own size."""
    batch = q.shape[0]
    block_mask = plan.cached(("valid", "flex_block_mask", batch), lambda: plan.to_flex_block_mask(batch))
    scores = _eager_flex_score_bytes(q, k)
    compiled = q.device.type == "cuda" or scores > FLEX_EAGER_SCORE_BYTES
    options = None
    if q.device.type == "cuda" and min(plan.block_size_q, plan.block_size_k) < 128:
        options = {"BLOCK_M": min(plan.block_size_q, 128), "BLOCK_N": min(plan.block_size_k, 128)}
    try:
        return _flex_attention(compiled)(q, k, v, block_mask=block_mask, scale=scale, kernel_options=options)
    except Exception as error:
        if q.device.type == "cuda" or not compiled:
            raise
        batch, heads, seq, _ = q.shape
        raise RuntimeError(
            f"backend='flex' on CPU compiles FlexAttention for inputs this large (eager FlexAttention would hold "
            f"{batch}x{heads}x{seq}x{k.shape[2]} scores, {scores / 2**30:.1f} GiB, over the "
            f"{FLEX_EAGER_SCORE_BYTES / 2**30:.2f} GiB bound), and compiling it failed: {type(error).__name__}: "
            f"{error}. Use backend='torch', the CPU fast path, which never holds the scores."
        ) from error


# Eager FlexAttention materialises every score (fp32): on CPU, inputs whose scores would take more
# than this run through compiled FlexAttention instead.
FLEX_EAGER_SCORE_BYTES = 1 << 28


def _eager_flex_score_bytes(q: torch.Tensor, k: torch.Tensor) -> int:
    batch, heads, seq, _ = q.shape
    return batch * heads * seq * k.shape[2] * 4


@functools.cache
def _flex_attention(compiled: bool):
    """``flex_attention``, compiled once per process, or eager (which materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


_KERNELS = {"torch": _torch_kernel, "triton": _triton_kernel, "flex": _flex_kernel}
