"""The one form every sparse pattern takes: per-head token orders and a block mask over them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .layout import TokenLayout

_TOKEN_MASK_LIMIT = 1 << 28


class BlockSparsePlan:
    """Which key blocks each query block attends, per batch element and head.

    Queries are gathered into ``q_order`` and keys/values into ``kv_order`` (``order[b, h, p]`` is
    the original position of the token at permuted position ``p``; ``None`` is the identity). The
    permuted sequences are cut into blocks of ``block_size_q`` / ``block_size_k`` tokens (the last
    may be partial) and query block ``i`` of head ``h`` attends key blocks
    ``kv_indices[kv_offsets[b, h, i] : kv_offsets[b, h, i] + kv_counts[b, h, i]]``, sorted.

    Text tokens sit at the end of every order. Blocks holding any text are text blocks: every
    query block attends every text key block, and text query blocks attend everything.

    Blocks may also vary in size per head (cluster-aligned blocks, see docs/kernels.md):
    ``q_starts`` / ``kv_starts`` ``[B|1, H|1, n + 1]`` are then the block boundaries in the plan's
    order, block ``i`` holding positions ``starts[i] .. starts[i + 1] - 1``: at most the block size
    and possibly none (empty blocks attend and are attended by nothing). ``None``: blocks of exactly
    the block size (the last may be partial).

    A batch dimension of 1 (counts, orders or starts) is shared by every batch element.

    Example::

        >>> layout = TokenLayout(grid=(2, 8, 8), text_len=10)
        >>> nb = layout.num_blocks(32)
        >>> mask = torch.eye(nb, dtype=torch.bool).expand(3, nb, nb)   # 3 heads, block diagonal
        >>> plan = BlockSparsePlan.from_block_mask(mask, layout, 32, q_order=layout.tile_order((1, 4, 8)))
        >>> round(plan.density(), 3)
        0.355
    """

    def __init__(
        self,
        layout: TokenLayout,
        block_size: int | tuple[int, int],
        kv_counts: torch.Tensor,
        kv_indices: torch.Tensor,
        q_order: torch.Tensor | None = None,
        kv_order: torch.Tensor | None = None,
        q_starts: torch.Tensor | None = None,
        kv_starts: torch.Tensor | None = None,
    ) -> None:
        self.layout = layout
        self.block_size_q, self.block_size_k = _check_block_size(block_size)
        self.q_starts = _normalise_starts(q_starts, layout, self.block_size_q, "q_starts")
        self.kv_starts = _normalise_starts(kv_starts, layout, self.block_size_k, "kv_starts")
        self.num_q_blocks = _count_blocks(self.q_starts, layout, self.block_size_q)
        self.num_kv_blocks = _count_blocks(self.kv_starts, layout, self.block_size_k)
        if kv_counts.dim() == 2:
            kv_counts = kv_counts.unsqueeze(0)
        if kv_counts.dim() != 3 or kv_counts.shape[-1] != self.num_q_blocks:
            raise ValueError(
                f"kv_counts must be [B, H, nQ] with nQ = {self.num_q_blocks} query blocks of "
                f"{self.block_size_q} tokens for a sequence of {layout.seq_len}, got {tuple(kv_counts.shape)}"
            )
        self.kv_counts = kv_counts.to(torch.int32).contiguous()
        self.kv_indices = kv_indices.to(torch.int32).reshape(-1).contiguous()
        self.kv_offsets = _exclusive_cumsum(self.kv_counts)
        self.q_order = _normalise_order(q_order, layout, "q_order")
        self.kv_order = _normalise_order(kv_order, layout, "kv_order")
        self.batch_size = _common_batch(self.kv_counts, self.q_order, self.kv_order, self.q_starts, self.kv_starts)
        self.num_heads = self.kv_counts.shape[1]
        for name in ("q_order", "kv_order", "q_starts", "kv_starts"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.shape[1] not in (1, self.num_heads):
                raise ValueError(f"{name} has {tensor.shape[1]} heads but the block mask has {self.num_heads}")
        self._validate_rows()
        self._derived: dict[Any, Any] = {}

    @classmethod
    def from_block_mask(
        cls,
        block_mask: torch.Tensor,
        layout: TokenLayout,
        block_size: int | tuple[int, int],
        q_order: torch.Tensor | None = None,
        kv_order: torch.Tensor | None = None,
        q_starts: torch.Tensor | None = None,
        kv_starts: torch.Tensor | None = None,
    ) -> BlockSparsePlan:
        """Build a plan from a boolean ``[H, nQ, nK]`` or ``[B, H, nQ, nK]`` mask over the permuted
        sequence (over the blocks ``q_starts`` / ``kv_starts`` bound, when given). Text rows and
        columns are switched on whatever the mask says."""
        bq, bk = _check_block_size(block_size)
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
        if block_mask.dim() == 3:
            block_mask = block_mask.unsqueeze(0)
        q_starts = _normalise_starts(q_starts, layout, bq, "q_starts")
        kv_starts = _normalise_starts(kv_starts, layout, bk, "kv_starts")
        n_q, n_k = _count_blocks(q_starts, layout, bq), _count_blocks(kv_starts, layout, bk)
        if block_mask.dim() != 4 or block_mask.shape[-2:] != (n_q, n_k):
            raise ValueError(
                f"block_mask must be [H, nQ, nK] or [B, H, nQ, nK] with nQ = {n_q}, nK = {n_k} for "
                f"{layout.seq_len} tokens in blocks of ({bq}, {bk}), got {tuple(block_mask.shape)}"
            )
        text_q = _text_blocks(_bounds(q_starts, layout, bq, block_mask.device), layout)
        text_k = _text_blocks(_bounds(kv_starts, layout, bk, block_mask.device), layout)
        block_mask = block_mask | text_q[..., :, None] | text_k[..., None, :]
        counts = block_mask.sum(-1, dtype=torch.int32)
        indices = block_mask.nonzero()[:, -1]
        return cls(layout, (bq, bk), counts, indices, q_order, kv_order, q_starts, kv_starts)

    # ----------------------------------------------------------------- views of the plan

    def to_block_mask(self) -> torch.Tensor:
        """The plan as a dense boolean ``[B, H, nQ, nK]`` block map."""
        mask = torch.zeros(*self.kv_counts.shape, self.num_kv_blocks, dtype=torch.bool, device=self.device)
        rows = torch.repeat_interleave(torch.arange(self.kv_counts.numel(), device=self.device), self.kv_counts.reshape(-1).long())
        mask.view(-1, self.num_kv_blocks)[rows, self.kv_indices.long()] = True
        return mask

    def to_token_mask(self, batch_size: int | None = None) -> torch.Tensor:
        """Boolean ``[B, H, S, S]`` in the original token order: ``[b, h, i, j]`` is whether query
        ``i`` attends key ``j``, text padding included. For tests on small sequences only."""
        batch = self._resolve_batch(batch_size)
        s = self.layout.seq_len
        if batch * self.num_heads * s * s > _TOKEN_MASK_LIMIT:
            raise ValueError(
                f"to_token_mask would allocate {batch}x{self.num_heads}x{s}x{s} booleans; it is meant for "
                f"small test sequences only"
            )
        blocks = self.to_block_mask().expand(batch, -1, -1, -1)
        pos = torch.arange(s, device=self.device)
        b_idx = torch.arange(batch, device=self.device)[:, None, None, None]
        h_idx = torch.arange(self.num_heads, device=self.device)[None, :, None, None]
        q_block, k_block = self.position_blocks("q", batch), self.position_blocks("kv", batch)
        permuted = blocks[b_idx, h_idx, q_block[..., :, None], k_block[..., None, :]]
        valid = self.layout.key_valid_len(batch)
        if valid is not None:
            permuted = permuted & (pos[None, :] < valid.to(self.device)[:, None])[:, None, None, :]
        inv_q = self.inverse_order("q", batch)
        inv_k = self.inverse_order("kv", batch)
        return permuted[b_idx, h_idx, inv_q[:, :, :, None], inv_k[:, :, None, :]]

    def to_flex_block_mask(self, batch_size: int | None = None):
        """A FlexAttention ``BlockMask`` over the permuted sequence (apply the orders first).

        Blocks that lie wholly inside the sequence and the valid keys are "full" (no mask_mod);
        the others are partial. The mask_mod is exact on its own (block map and valid keys), as
        FlexAttention's unfused path applies it to every score.
        """
        from torch.nn.attention.flex_attention import BlockMask

        batch = self._resolve_batch(batch_size)
        s = self.layout.seq_len
        blocks = self.to_block_mask().expand(batch, -1, -1, -1)
        valid = self.layout.key_valid_len(batch)
        valid = torch.full((batch,), s, dtype=torch.int32) if valid is None else valid
        valid = valid.to(self.device)
        if self.variable_blocks:
            return self._flex_variable_block_mask(blocks, valid)
        block_end = torch.arange(1, self.num_kv_blocks + 1, device=self.device) * self.block_size_k
        full_block = block_end[None, :] <= valid[:, None]
        full = blocks & full_block[:, None, None, :]
        partial = blocks & ~full_block[:, None, None, :]

        bq, bk = self.block_size_q, self.block_size_k

        def mask_mod(b, h, q_idx, kv_idx):
            return blocks[b, h, q_idx // bq, kv_idx // bk] & (kv_idx < valid[b])

        def compressed(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            counts = m.sum(-1, dtype=torch.int32)
            order = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)
            return counts, order.to(torch.int32)

        kv_num, kv_idx = compressed(partial)
        full_num, full_idx = compressed(full)
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx,
            BLOCK_SIZE=(self.block_size_q, self.block_size_k), mask_mod=mask_mod, seq_lengths=(s, s),
        )

    def _flex_variable_block_mask(self, blocks: torch.Tensor, valid: torch.Tensor):
        """The FlexAttention ``BlockMask`` of a plan with variable blocks: Flex's fixed blocks that
        overlap any kept block pair, all partial, and a mask_mod that looks up each token's block."""
        from torch.nn.attention.flex_attention import BlockMask

        batch, s = blocks.shape[0], self.layout.seq_len
        bq, bk = self.block_size_q, self.block_size_k
        q_block, k_block = self.position_blocks("q", batch), self.position_blocks("kv", batch)

        def overlap(block_of: torch.Tensor, size: int, count: int) -> torch.Tensor:
            """``[B, H, nFlex, count]``: which plan blocks each Flex block of ``size`` tokens holds."""
            flex = torch.arange(s, device=self.device) // size
            out = torch.zeros(*block_of.shape[:2], -(-s // size), count, device=self.device)
            index = flex * count + block_of
            out.view(*block_of.shape[:2], -1).scatter_(-1, index, 1.0)
            return out

        coarse = overlap(q_block, bq, self.num_q_blocks) @ blocks.float() @ overlap(k_block, bk, self.num_kv_blocks).transpose(-1, -2)
        coarse = coarse > 0
        counts = coarse.sum(-1, dtype=torch.int32)
        order = torch.argsort(coarse.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

        def mask_mod(b, h, q_idx, kv_idx):
            return blocks[b, h, q_block[b, h, q_idx], k_block[b, h, kv_idx]] & (kv_idx < valid[b])

        return BlockMask.from_kv_blocks(counts, order, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(s, s))

    def density(self, per_head: bool = False) -> float | torch.Tensor:
        """Fraction of the dense attention FLOPs the plan keeps, counting the true sizes of partial
        (and variable) blocks: a float overall, or ``[B, H]`` per head."""
        s = self.layout.seq_len
        q_sizes = self.block_sizes("q").expand(self.batch_size, self.num_heads, -1)
        k_sizes = self.block_sizes("kv").expand(self.batch_size, self.num_heads, -1).reshape(-1, self.num_kv_blocks)
        rows = torch.repeat_interleave(torch.arange(k_sizes.shape[0], device=self.device), self.kv_counts.sum(-1).reshape(-1).long())
        keys = k_sizes[rows, self.kv_indices.long()]
        per_row = _segment_sum(keys, self.kv_counts)
        kept = (per_row * q_sizes).sum(-1).double() / (s * s)
        return kept if per_head else float(kept.mean())

    @property
    def variable_blocks(self) -> bool:
        """Whether the blocks vary in size (``q_starts`` or ``kv_starts`` given)."""
        return self.q_starts is not None or self.kv_starts is not None

    def block_starts(self, which: str) -> torch.Tensor:
        """``[B|1, H|1, n + 1]`` int64 boundaries of the query (``"q"``) or key (``"kv"``) blocks
        in the plan's order (fixed blocks made explicit)."""
        starts, size = (self.q_starts, self.block_size_q) if which == "q" else (self.kv_starts, self.block_size_k)
        return _bounds(starts, self.layout, size, self.device)

    def block_sizes(self, which: str) -> torch.Tensor:
        """``[B|1, H|1, n]`` tokens in each query (``"q"``) or key (``"kv"``) block."""
        starts = self.block_starts(which)
        return starts[..., 1:] - starts[..., :-1]

    def text_blocks(self, which: str) -> torch.Tensor:
        """``[B|1, H|1, n]``: the query (``"q"``) or key (``"kv"``) blocks that hold any text."""
        return _text_blocks(self.block_starts(which), self.layout)

    def position_blocks(self, which: str, batch_size: int | None = None) -> torch.Tensor:
        """``[B, H, S]``: the query (``"q"``) or key (``"kv"``) block of each position of the plan's order."""
        batch = self._resolve_batch(batch_size)
        starts = self.block_starts(which)
        pos = torch.arange(self.layout.seq_len, device=self.device)
        blocks = torch.searchsorted(starts[..., 1:].contiguous(), pos.expand(*starts.shape[:-1], -1).contiguous(), right=True)
        return blocks.expand(batch, self.num_heads, -1)

    def inverse_order(self, which: str, batch_size: int | None = None) -> torch.Tensor:
        """``[B, H, S]`` inverse of the query (``"q"``) or key (``"kv"``) order."""
        batch = self._resolve_batch(batch_size)
        order = self.order(which, batch)
        return self.cached(("inverse", which, batch), lambda: TokenLayout.inverse(order))

    def order(self, which: str, batch_size: int | None = None) -> torch.Tensor:
        """``[B, H, S]`` query (``"q"``) or key (``"kv"``) order (a broadcast view; identity made
        explicit)."""
        batch = self._resolve_batch(batch_size)
        order = {"q": self.q_order, "kv": self.kv_order}[which]
        if order is None:
            order = torch.arange(self.layout.seq_len, device=self.device).expand(1, 1, -1)
        return order.expand(batch, self.num_heads, -1)

    # ----------------------------------------------------------------- plumbing

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Memoise something derived from this (immutable) plan, such as gather indices."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def to(self, device: torch.device | str) -> BlockSparsePlan:
        if torch.device(device) == self.device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BlockSparsePlan(
            self.layout, (self.block_size_q, self.block_size_k), move(self.kv_counts), move(self.kv_indices),
            move(self.q_order), move(self.kv_order), move(self.q_starts), move(self.kv_starts),
        )

    def with_layout(self, layout: TokenLayout) -> BlockSparsePlan:
        """The same plan for a layout that differs only in text padding (a new prompt)."""
        if layout.geometry != self.layout.geometry:
            raise ValueError(f"a plan for layout {self.layout.geometry} cannot serve layout {layout.geometry}")
        if layout == self.layout:
            return self
        plan = BlockSparsePlan.__new__(BlockSparsePlan)
        plan.__dict__.update(self.__dict__)
        plan.layout = layout
        plan._derived = {k: v for k, v in self._derived.items() if k[0] != "valid"}
        return plan

    def tensors(self) -> dict[str, torch.Tensor]:
        """The plan's tensors by name (for safetensors); rebuild with :meth:`from_tensors`."""
        out = {"kv_counts": self.kv_counts, "kv_indices": self.kv_indices}
        for name in ("q_order", "kv_order", "q_starts", "kv_starts"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], layout: TokenLayout, block_size: int | tuple[int, int]
    ) -> BlockSparsePlan:
        return cls(
            layout, block_size, tensors["kv_counts"], tensors["kv_indices"],
            tensors.get("q_order"), tensors.get("kv_order"), tensors.get("q_starts"), tensors.get("kv_starts"),
        )

    @staticmethod
    def concat_batch(plans: Sequence[BlockSparsePlan]) -> BlockSparsePlan:
        """One plan whose batch elements are the given plans' (each of batch size 1), in order,
        e.g. ``[uncond, cond]`` for batched classifier-free guidance."""
        first = plans[0]
        for p in plans:
            if p.batch_size != 1 or p.layout.geometry != first.layout.geometry or (
                (p.block_size_q, p.block_size_k) != (first.block_size_q, first.block_size_k)
            ):
                raise ValueError("concat_batch takes plans of batch size 1 with one layout and block size")
        return _concat(plans, 0, 1)

    def select_heads(self, heads: Sequence[int]) -> BlockSparsePlan:
        """The plan of the given heads, in that order (e.g. one rank's slice under context
        parallelism).

        Example::

            >>> layout = TokenLayout((2, 8, 8))
            >>> mask = torch.rand(4, 4, 4) < 0.5
            >>> plan = BlockSparsePlan.from_block_mask(mask, layout, 32)
            >>> bool((plan.select_heads(range(2, 4)).to_block_mask() == mask[None, 2:]).all())
            True
        """
        index = torch.tensor(list(heads), dtype=torch.long, device=self.device)

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return tensor if tensor is None or tensor.shape[1] == 1 else tensor.index_select(1, index)

        return BlockSparsePlan.from_block_mask(
            self.to_block_mask().index_select(1, index), self.layout, (self.block_size_q, self.block_size_k),
            q_order=pick(self.q_order), kv_order=pick(self.kv_order), q_starts=pick(self.q_starts),
            kv_starts=pick(self.kv_starts),
        )

    @staticmethod
    def concat_heads(plans: Sequence[BlockSparsePlan]) -> BlockSparsePlan:
        """One plan whose heads are the given plans' heads, in order (e.g. every rank's slice under
        context parallelism); the plans share layout, block size and batch size."""
        first = plans[0]
        for p in plans:
            if p.batch_size != first.batch_size or p.layout.geometry != first.layout.geometry or (
                (p.block_size_q, p.block_size_k) != (first.block_size_q, first.block_size_k)
            ):
                raise ValueError("concat_heads takes plans of one batch size, layout and block size")
        return _concat(plans, 1, first.batch_size)

    def __repr__(self) -> str:
        return (
            f"BlockSparsePlan(grid={self.layout.grid}, text={self.layout.text_len}, batch={self.batch_size}, "
            f"heads={self.num_heads}, blocks=({self.block_size_q}, {self.block_size_k}), "
            f"density={self.density():.3f})"
        )

    def _resolve_batch(self, batch_size: int | None) -> int:
        if batch_size is None:
            return self.batch_size
        if self.batch_size not in (1, batch_size):
            raise ValueError(f"plan was built for batch size {self.batch_size}, not {batch_size}")
        return batch_size

    def _validate_rows(self) -> None:
        counts = self.kv_counts
        if (counts < 0).any() or (counts > self.num_kv_blocks).any():
            raise ValueError(f"kv_counts must lie in [0, {self.num_kv_blocks}]")
        total = int(counts.sum())
        if self.kv_indices.numel() != total:
            raise ValueError(f"kv_indices holds {self.kv_indices.numel()} entries but kv_counts sum to {total}")
        idx = self.kv_indices.long()
        if total and (idx.min() < 0 or idx.max() >= self.num_kv_blocks):
            raise ValueError(f"kv_indices out of range: key block indices must lie in [0, {self.num_kv_blocks})")
        row_start = torch.zeros(total, dtype=torch.bool, device=idx.device)
        row_start[self.kv_offsets.reshape(-1)[counts.reshape(-1) > 0]] = True
        if total > 1 and not (idx[1:] > idx[:-1])[~row_start[1:]].all():
            raise ValueError("the key block indices of each row must be strictly increasing (sorted, no repeats)")
        text_q, counts = torch.broadcast_tensors(_text_blocks(self.block_starts("q"), self.layout), counts)
        if (counts[text_q] != self.num_kv_blocks).any():
            raise ValueError("text query blocks must attend every key block")
        text_k = _text_blocks(self.block_starts("kv"), self.layout)
        if text_k.any():
            attended = self.to_block_mask() | ~text_k[..., None, :]
            if not attended.all():
                raise ValueError("every query block must attend all text key blocks")


def _concat(plans: Sequence[BlockSparsePlan], dim: int, batch: int) -> BlockSparsePlan:
    """The plans joined along the batch (``dim=0``) or head (``dim=1``) dimension, on one block
    count: when any has variable blocks, each gets empty blocks appended up to the largest count."""
    first = plans[0]
    variable = any(p.variable_blocks for p in plans)
    n_q, n_k = max(p.num_q_blocks for p in plans), max(p.num_kv_blocks for p in plans)
    parts: dict[str, list[torch.Tensor]] = {"mask": [], "q": [], "kv": [], "q_starts": [], "kv_starts": []}
    for p in plans:
        mask = p.to_block_mask().expand(batch, -1, -1, -1)
        parts["mask"].append(torch.nn.functional.pad(mask, (0, n_k - p.num_kv_blocks, 0, n_q - p.num_q_blocks)))
        for which, n in (("q", n_q), ("kv", n_k)):
            parts[which].append(p.order(which, batch))
            starts = p.block_starts(which).expand(batch, p.num_heads, -1)
            parts[f"{which}_starts"].append(torch.nn.functional.pad(starts, (0, n + 1 - starts.shape[-1]), value=p.layout.seq_len))
    joined = {name: torch.cat(tensors, dim) for name, tensors in parts.items()}
    orders = {w: joined[w] if any(getattr(p, f"{w}_order") is not None for p in plans) else None for w in ("q", "kv")}
    return BlockSparsePlan.from_block_mask(
        joined["mask"], first.layout, (first.block_size_q, first.block_size_k), q_order=orders["q"],
        kv_order=orders["kv"], q_starts=joined["q_starts"] if variable else None,
        kv_starts=joined["kv_starts"] if variable else None,
    )


def _check_block_size(block_size: int | tuple[int, int]) -> tuple[int, int]:
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if bq < 1 or bk < 1:
        raise ValueError(f"block sizes must be positive, got {block_size!r}")
    return int(bq), int(bk)


def _normalise_order(order: torch.Tensor | None, layout: TokenLayout, name: str) -> torch.Tensor | None:
    if order is None:
        return None
    s = layout.seq_len
    order = order.long()
    while order.dim() < 3:
        order = order.unsqueeze(0)
    if order.dim() != 3 or order.shape[-1] != s:
        raise ValueError(f"{name} must be [S], [H, S] or [B, H, S] with S = {s}, got {tuple(order.shape)}")
    if not (torch.sort(order, dim=-1).values == torch.arange(s, device=order.device)).all():
        raise ValueError(f"{name} is not a permutation of 0..{s - 1} in every head")
    text = torch.arange(layout.text_offset, layout.text_offset + layout.text_len, device=order.device)
    if not (order[..., layout.video_len :] == text).all():
        raise ValueError(f"{name} must end with the text tokens in their original order")
    return order.contiguous()


def _common_batch(*tensors: torch.Tensor | None) -> int:
    sizes = {t.shape[0] for t in tensors if t is not None}
    if len(sizes - {1}) > 1:
        raise ValueError(f"block mask and orders disagree on the batch size: {sorted(sizes)}")
    return max(sizes)


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    flat = counts.reshape(-1).long()
    return (torch.cumsum(flat, 0) - flat).reshape(counts.shape)


def _segment_sum(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over each row of a compressed-row layout, shaped like ``counts``."""
    csum = torch.cat([values.new_zeros(1), torch.cumsum(values, 0)])
    ends = torch.cumsum(counts.reshape(-1).long(), 0)
    return (csum[ends] - csum[ends - counts.reshape(-1).long()]).reshape(counts.shape)


def _normalise_starts(starts: torch.Tensor | None, layout: TokenLayout, block: int, name: str) -> torch.Tensor | None:
    """``[B|1, H|1, n + 1]`` int64 block boundaries, checked: from 0 to S, each block at most ``block``."""
    if starts is None:
        return None
    starts = starts.long()
    while starts.dim() < 3:
        starts = starts.unsqueeze(0)
    s = layout.seq_len
    if starts.dim() != 3 or starts.shape[-1] < 2:
        raise ValueError(f"{name} must be [n + 1], [H, n + 1] or [B, H, n + 1] block boundaries, got {tuple(starts.shape)}")
    sizes = starts[..., 1:] - starts[..., :-1]
    if (starts[..., 0] != 0).any() or (starts[..., -1] != s).any() or (sizes < 0).any() or (sizes > block).any():
        raise ValueError(
            f"{name} must rise from 0 to the sequence length {s} in steps of 0 to the block size {block} "
            f"(blocks of at most {block} tokens; use cluster_block_starts to cut clusters into blocks)"
        )
    return starts.contiguous()


def _count_blocks(starts: torch.Tensor | None, layout: TokenLayout, block: int) -> int:
    return layout.num_blocks(block) if starts is None else starts.shape[-1] - 1


def _bounds(starts: torch.Tensor | None, layout: TokenLayout, block: int, device: torch.device) -> torch.Tensor:
    """``[B|1, H|1, n + 1]`` block boundaries, those of fixed blocks when ``starts`` is ``None``."""
    if starts is not None:
        return starts.to(device)
    s = layout.seq_len
    return torch.clamp(torch.arange(layout.num_blocks(block) + 1, device=device) * block, max=s).view(1, 1, -1)


def _text_blocks(bounds: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``[B|1, H|1, n]``: blocks holding any text token (text sits at the end of every order)."""
    if not layout.text_len:
        return torch.zeros_like(bounds[..., 1:], dtype=torch.bool)
    return bounds[..., 1:] > torch.clamp(bounds[..., :-1], min=layout.video_len)
