"""Block-sparse attention in PyTorch: the CPU fast path (and the fallback wherever Triton is absent).

Only the kept blocks are computed. Query blocks are grouped by how many key blocks they attend;
for a chunk of query blocks with the same count, their key and value blocks are gathered into small
per-thread buffers (sized to stay in cache, reused across chunks and calls) and one batched
``scaled_dot_product_attention`` runs over them. Query blocks that attend every key block attend
the keys in place, and so do chunks of rows whose key blocks are one run each, starting equally far
apart (a strided view). Query blocks of a head that attend the same key blocks (a query cluster's
blocks) are one longer query of the batched call, in pieces of up to MOST_MERGED blocks: their keys
are gathered once, and the CPU SDPA kernel runs long queries faster than short ones.

The token gathers into each head's order are part of the kernel: ``q_rows`` and ``kv_rows`` say
which row of ``x.reshape(-1, D)`` holds each (batch, head, position in the plan's order), so inputs
in diffusers' ``(B, S, H, D)`` layout need no head-major copy, and the output comes back in ``q``'s
layout. Queries, keys and values are gathered once per call into block-major buffers kept per
thread across calls; a chunk of consecutive query blocks reads its queries and writes its output
as slices of them, and the output is put back in ``q``'s layout by one gather at the end.
Everything that depends on the plan alone (the slots' source rows, the chunks) is a
:class:`TorchSchedule`, which ``sparse_attention`` works out once per plan.

Layouts (the sequence in the plan's token order unless ``q_rows``/``kv_rows`` say otherwise):
    q, k, v      [B, H, S, D], or any contiguous tensor with rows of D when q_rows/kv_rows are given
    q_rows       [B, H, S] int64 or None: row of q.reshape(-1, D) for query p of (b, h)
    kv_rows      [B, H, S] int64 or None: the same for k and v
    kv_counts    [Bp, H, nQ] int   (Bp = B, or 1 to share one plan across the batch)
    kv_offsets   [Bp, H, nQ] int   start of each row in kv_indices
    kv_indices   [nnz] int         sorted key block indices of every row, rows concatenated
    kv_valid_len [B] int or None   keys at (plan-order) positions >= kv_valid_len[b] are masked out
    q_starts     [Bp|1, H|1, nQ+1] int or None  variable query blocks: block i holds positions
                 q_starts[i] .. q_starts[i+1]-1 (at most block_size_q); None: fixed blocks
    kv_starts    [Bp|1, H|1, nK+1] int or None  the same for the key blocks
    schedule     TorchSchedule or None: torch_schedule(...) of these arguments, worked out earlier

Variable query blocks are computed as blocks of the full block size whose positions past the
block's end are discarded. With variable key blocks, a row gathers only the keys its blocks hold
(rows of a chunk padded to the longest, the padding masked out), so a block of a few keys costs a
few keys, not a full block.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 19


def block_sparse_attention_torch(
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
    q_rows: torch.Tensor | None = None,
    kv_rows: torch.Tensor | None = None,
    q_starts: torch.Tensor | None = None,
    kv_starts: torch.Tensor | None = None,
    schedule: TorchSchedule | None = None,
) -> torch.Tensor:
    """Block-sparse softmax attention; query blocks with no (valid) key give zeros.

    Returns a tensor shaped like ``q`` in ``q``'s dtype: ``[B, H, S, D]`` in the plan's order, or,
    with ``q_rows``, each result in the row its query came from. ``schedule`` (from
    :func:`torch_schedule` on the same arguments) skips deriving it again: what depends on the plan
    alone is worked out once per plan, not once per call.

    Example::

        >>> q = k = v = torch.randn(1, 1, 100, 16)
        >>> counts = torch.tensor([[[1, 2]]]); offsets = torch.tensor([[[0, 1]]])
        >>> out = block_sparse_attention_torch(q, k, v, counts, offsets, torch.tensor([0, 0, 1]), 64, 64)
        >>> out.shape
        torch.Size([1, 1, 100, 16])
    """
    if schedule is None:
        shape = tuple(q.shape[:3] if q_rows is None else q_rows.shape)
        schedule = torch_schedule(
            kv_counts, kv_offsets, kv_indices, block_size_q, block_size_k, shape, q.shape[-1], kv_valid_len,
            q_rows, kv_rows, q_starts, kv_starts,
        )
    s = schedule
    dim = q.shape[-1]
    q_blocks, k_blocks, v_blocks = (
        x.contiguous().view(-1, dim) if slots is None else _gather_rows(x, slots, name)
        for name, x, slots in (("q_blocks", q, s.q_slots), ("k_blocks", k, s.kv_slots), ("v_blocks", v, s.kv_slots))
    )
    # the output in query slots: the result itself where the slots are q's rows, else scratch
    out = q_blocks.new_empty(q_blocks.shape) if s.out_rows is None else _buffer("out_blocks", q_blocks.shape, q)
    q_blocks, out, k_blocks, v_blocks = (
        x.view(-1, width * dim) for x, width in ((q_blocks, s.bq), (out, s.bq), (k_blocks, s.bk), (v_blocks, s.bk))
    )
    if s.dead.numel():
        out.index_fill_(0, s.dead, 0)
    _attend_full_rows(q_blocks, k_blocks, v_blocks, out, s, scale)
    if s.chunks:
        work = partial(_attend_chunks, q_blocks, k_blocks, v_blocks, out, s, scale)
        workers = min(torch.get_num_threads(), len(s.chunks)) if q.device.type == "cpu" else 1
        if workers == 1:
            work(iter(range(len(s.chunks))))
        else:
            # each worker takes the next chunk when it is free: a worker descheduled by another job
            # on the machine holds up one chunk, not a fixed share of them
            shared = _SharedCounter(len(s.chunks))
            with _single_threaded_ops():
                list(_pool(workers).map(lambda _: work(shared), range(workers)))
    out = out.view(-1, dim)
    return (out if s.out_rows is None else out.index_select(0, s.out_rows)).view(q.shape)


class TorchSchedule(NamedTuple):
    """What the PyTorch kernel derives from a plan before it reads q, k and v: where each query and
    key slot reads from, which query blocks are dead, full or sparse, and the sparse ones' chunks.

    Rows of the block-major queries and output (``[B*H*nQ, bq*D]``) are query blocks; rows of the
    block-major keys (``[B*H*nK, bk*D]``) key blocks."""

    bq: int
    bk: int
    n_q: int
    n_k: int
    q_slots: torch.Tensor | None      # [B*H*nQ*bq] row of q.reshape(-1, D) each query slot reads; None: q's rows are its slots
    out_rows: torch.Tensor | None     # [B*H*S] the query slot holding each row of the result; None: the slots are the result
    kv_slots: torch.Tensor | None     # [B*H*nK*bk] the same for the keys and values
    key_ok: torch.Tensor | None       # [B*H, nK, bk] whether a key slot is valid; None: all are
    key_len: torch.Tensor | None      # [B*H, nK] valid keys of each block (a prefix of its slots); None: not needed
    counts: torch.Tensor              # [B*H*nQ] key blocks of each query block
    offsets: torch.Tensor             # [B*H*nQ] start of each query block's key blocks in indices
    indices: torch.Tensor             # [nnz] key block indices
    dead: torch.Tensor                # query blocks with no valid key (zeros)
    full_calls: list[_FullCall]       # query blocks that attend every key block
    chunks: list[_Chunk]              # the other query blocks
    most_keys: int                    # elements of the largest chunk's gathered keys


def torch_schedule(
    kv_counts: torch.Tensor,
    kv_offsets: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size_q: int,
    block_size_k: int,
    shape: tuple[int, int, int],
    dim: int,
    kv_valid_len: torch.Tensor | None = None,
    q_rows: torch.Tensor | None = None,
    kv_rows: torch.Tensor | None = None,
    q_starts: torch.Tensor | None = None,
    kv_starts: torch.Tensor | None = None,
) -> TorchSchedule:
    """The :class:`TorchSchedule` of :func:`block_sparse_attention_torch` for queries of ``shape``
    ``(B, H, S)`` and head dim ``dim`` (the other arguments as there).

    Example::

        >>> s = torch_schedule(torch.tensor([[[1, 2]]]), torch.tensor([[[0, 1]]]), torch.tensor([0, 0, 1]), 64, 64, (1, 1, 100), 16)
        >>> [chunk.count for chunk in s.chunks], len(s.full_calls)
        ([1], 1)
    """
    batch, heads, seq = shape
    device = kv_counts.device
    bq, bk = block_size_q, block_size_k
    n_q = -(-seq // bq) if q_starts is None else q_starts.shape[-1] - 1
    n_k = -(-seq // bk) if kv_starts is None else kv_starts.shape[-1] - 1
    counts = kv_counts.expand(batch, -1, -1).reshape(-1).long()
    offsets = kv_offsets.expand(batch, -1, -1).reshape(-1)
    indices = kv_indices.long()

    # slots past a block's end read any real row; the result takes none of them
    q_pos, q_real = _block_positions(q_starts, batch, heads, seq, n_q, bq, device)
    q_slots = out_rows = None
    if q_rows is not None or q_starts is not None or seq != n_q * bq:
        q_slots = _source_rows(q_rows, q_pos, batch, heads, seq, device)
        real = q_real.reshape(-1)
        out_rows = torch.empty(batch * heads * seq, dtype=_index_dtype(q_slots.numel()), device=device)
        out_rows[q_slots[real].long()] = torch.nonzero(real).squeeze(1).to(out_rows.dtype)
    kv_pos, kv_real = _block_positions(kv_starts, batch, heads, seq, n_k, bk, device)
    kv_slots = None
    if kv_rows is not None or kv_starts is not None or seq != n_k * bk:
        kv_slots = _source_rows(kv_rows, kv_pos, batch, heads, seq, device)
    limit = _valid_limit(batch, seq, kv_valid_len, device)
    key_ok = (kv_real & (kv_pos < limit.repeat_interleave(heads)[:, None])).view(batch * heads, n_k, bk)

    live = counts > 0
    if q_starts is not None:
        live &= q_real.view(-1, bq).any(-1)
    key_len = row_keys = None
    if kv_valid_len is not None or kv_starts is not None:
        key_len = key_ok.sum(-1)
        row_keys = _row_sums(counts, offsets, indices, key_len, n_q)
        live &= row_keys > 0
    # rows that attend every key block attend the keys in place, a prefix in plan order (not so when
    # variable key blocks leave gaps: those rows take the gathered path)
    full = live & (counts == n_k) & (kv_starts is None)
    sparse_rows = torch.nonzero(live & ~full).squeeze(1)
    chunks = []
    if sparse_rows.numel():
        if kv_starts is not None:
            chunks = _compact_chunks(sparse_rows, row_keys[sparse_rows], counts, offsets, indices, n_q, dim)
        else:
            row_counts = counts[sparse_rows]
            first, last = (indices[offsets[sparse_rows] + i] for i in (0, row_counts - 1))
            # rows whose key blocks are one run read them in place: a chunk of such rows whose runs start
            # a constant number of blocks apart is a strided view of the key (and value) blocks
            run_starts = torch.where(last - first + 1 == row_counts, sparse_rows // n_q * n_k + first, -1)
            chunks = _chunks(sparse_rows, row_counts, run_starts, offsets, indices, n_q, bk * dim)
    return TorchSchedule(
        bq, bk, n_q, n_k, q_slots, out_rows, kv_slots, None if bool(key_ok.all()) else key_ok, key_len,
        counts, offsets, indices, torch.nonzero(~live).squeeze(1), _full_calls(full, limit, heads, n_q), chunks,
        max((c.key_elements(bk * dim, dim) for c in chunks), default=0),
    )


def _source_rows(rows, pos, batch, heads, seq, device) -> torch.Tensor:
    """``[B*H*n*block]``: the row of the source tensor each slot reads (``rows`` ``[B, H, S]``, or
    the identity over ``[B, H, S, D]``)."""
    rows = torch.arange(batch * heads * seq, device=device) if rows is None else rows
    return rows.reshape(batch * heads, seq).gather(1, pos).reshape(-1).to(_index_dtype(pos.numel()))


def _index_dtype(size: int) -> torch.dtype:
    """int32 for indices into fewer than 2**31 rows (a schedule cached per plan takes half the
    memory), else int64."""
    return torch.int32 if size < 2**31 else torch.int64


def _block_positions(
    starts: torch.Tensor | None, batch: int, heads: int, seq: int, n: int, block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B*H, n*block]`` the plan-order position each slot of each block reads (a real one for
    slots past the block's end) and whether the slot holds a token of the block."""
    if starts is None:
        pos = torch.arange(n * block, device=device)
        real, pos = pos < seq, pos.clamp(max=seq - 1)
        return pos.expand(batch * heads, -1), real.expand(batch * heads, -1)
    starts = starts.to(device=device, dtype=torch.long).expand(batch, heads, -1).reshape(batch * heads, n + 1)
    pos = starts[:, :-1, None] + torch.arange(block, device=starts.device)
    real = pos < starts[:, 1:, None]
    return torch.where(real, pos, 0).view(batch * heads, n * block), real.view(batch * heads, n * block)


class _SharedCounter:
    """Chunk numbers ``0 .. n-1``, each handed to exactly one of the threads iterating over it."""

    def __init__(self, n: int) -> None:
        self._next, self._n, self._lock = 0, n, threading.Lock()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        with self._lock:
            if self._next == self._n:
                raise StopIteration
            self._next += 1
            return self._next - 1


class _BlockRows(NamedTuple):
    """Query blocks: rows of the block-major queries and output. ``first`` is set when they are
    consecutive, and reading or writing them is then a slice."""

    index: torch.Tensor
    first: int | None

    @classmethod
    def of(cls, index: torch.Tensor) -> _BlockRows:
        n = index.numel()
        consecutive = n > 0 and bool((index == index[0] + torch.arange(n, device=index.device)).all())
        return cls(index, int(index[0]) if consecutive else None)

    def read(self, blocks: torch.Tensor, scratch: str) -> torch.Tensor:
        """``blocks[index]``: a view, or a copy in this thread's buffer ``scratch``."""
        n = self.index.numel()
        if self.first is not None:
            return blocks[self.first : self.first + n]
        return torch.index_select(blocks, 0, self.index, out=_buffer(scratch, (n, blocks.shape[1]), blocks))

    def write(self, blocks: torch.Tensor, values: torch.Tensor) -> None:
        """``blocks[index] = values`` (``values`` viewed as ``[n, row]``)."""
        values = values.reshape(self.index.numel(), -1)
        if self.first is not None:
            blocks[self.first : self.first + len(values)].copy_(values)
        else:
            blocks.index_copy_(0, self.index, values)


class _Chunk(NamedTuple):
    """Query blocks that each attend ``count`` key blocks, computed in one batched call. With
    ``run_start`` set, row ``i``'s key blocks are blocks ``run_start + i * run_step ..`` of the
    block-major keys, read in place; otherwise they are gathered. A ``compact`` chunk's rows attend
    at most ``count`` keys each, gathered key by key (variable key blocks). Each ``merged``
    consecutive rows attend the same keys and are one query of the batched call."""

    count: int
    rows: _BlockRows
    run_start: int | None = None
    run_step: int = 0
    compact: bool = False
    merged: int = 1

    def key_elements(self, block_elements: int, dim: int) -> int:
        """Elements of the chunk's gathered keys (0 when they are read in place)."""
        if self.run_start is not None:
            return 0
        return self.rows.index.numel() // self.merged * self.count * (dim if self.compact else block_elements)


def _chunks(
    rows: torch.Tensor, counts: torch.Tensor, run_starts: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor,
    n_q: int, block_elements: int,
) -> list[_Chunk]:
    """Rows grouped by key-block count, cut so that each chunk holds about CHUNK_ELEMENTS of keys;
    the largest counts first. Rows whose key blocks are one run (``run_starts`` >= 0: the run's
    first block in the block-major keys) go in chunks whose runs start equally far apart; the
    others are gathered, rows that attend the same key blocks as one query."""
    order = torch.argsort(-counts * (run_starts.max() + 2) + run_starts, stable=True)
    chunks = []
    for count, group, starts in _groups(rows[order], counts[order], run_starts[order]):
        if starts is None:
            pieces = _shared_key_pieces(group, counts.new_full(group.shape, count), offsets, indices, n_q)
            chunks.extend(_piece_chunks(pieces, [count] * len(pieces), block_elements, False, rows.device))
        else:
            per_chunk = max(1, CHUNK_ELEMENTS // (count * block_elements))
            chunks.extend(
                _Chunk(count, _BlockRows.of(group[b:e]), starts[b], step) for b, e, step in _equal_steps(starts, per_chunk)
            )
    return chunks


def _compact_chunks(
    rows: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor,
    n_q: int, dim: int,
) -> list[_Chunk]:
    """Rows that attend the same key blocks as one query; those queries sorted by how many keys
    they attend (the most first), cut so that each chunk holds about CHUNK_ELEMENTS of keys with
    every query padded to the chunk's longest."""
    pieces = _shared_key_pieces(rows, counts[rows], offsets, indices, n_q)
    keys_of = dict(zip(rows.tolist(), keys.tolist()))
    return _piece_chunks(pieces, [keys_of[piece[0]] for piece in pieces], dim, True, rows.device)


MOST_MERGED = 8


def _shared_key_pieces(rows: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor, n_q: int) -> list[list[int]]:
    """``rows`` (query blocks, with their key-block ``counts``) in pieces of 1, 2, 4 .. MOST_MERGED
    rows of one head that attend the same key blocks: each piece is one longer query (the CPU SDPA
    kernel runs long queries faster, and their keys are gathered once)."""
    flat = indices.tolist()
    same_keys: dict[tuple, list[int]] = {}
    for row, start, count in zip(rows.tolist(), offsets[rows].tolist(), counts.tolist()):
        same_keys.setdefault((row // n_q, *flat[start : start + count]), []).append(row)
    pieces = []
    for group in same_keys.values():
        while group:
            size = min(MOST_MERGED, 1 << (len(group).bit_length() - 1))
            pieces.append(group[:size])
            group = group[size:]
    return pieces


def _piece_chunks(
    pieces: list[list[int]], keys: list[int], key_elements: int, compact: bool, device: torch.device
) -> list[_Chunk]:
    """Pieces of equal size in chunks, the most keys first, each chunk about CHUNK_ELEMENTS of keys
    (``key_elements`` per key of ``keys``) with every piece padded to the chunk's most."""
    order = sorted(range(len(pieces)), key=lambda i: (-len(pieces[i]), -keys[i]))
    chunks, begin = [], 0
    while begin < len(order):
        size, most = len(pieces[order[begin]]), keys[order[begin]]
        end = begin + 1
        while end < len(order) and end - begin < CHUNK_ELEMENTS // (most * key_elements) and len(pieces[order[end]]) == size:
            end += 1
        rows = torch.tensor([row for i in order[begin:end] for row in pieces[i]], device=device)
        chunks.append(_Chunk(most, _BlockRows.of(rows), compact=compact, merged=size))
        begin = end
    return chunks


def _groups(rows, counts, run_starts):
    """``(count, rows, run starts as a list or None)`` for each stretch of equal counts whose rows
    all are (or all are not) one run."""
    kinds = counts * 2 + (run_starts >= 0)
    values, sizes = torch.unique_consecutive(kinds, return_counts=True)
    for kind, group, starts in zip(values.tolist(), torch.split(rows, sizes.tolist()), torch.split(run_starts, sizes.tolist())):
        yield kind // 2, group, starts.tolist() if kind % 2 else None


def _equal_steps(starts: list[int], limit: int):
    """``(begin, end, step)`` cutting ``starts`` into stretches of at most ``limit`` that each
    advance by one ``step`` (0 for a stretch of one)."""
    begin = 0
    for end in range(1, len(starts) + 1):
        step = starts[begin + 1] - starts[begin] if end - begin > 1 else 0
        grows = end < len(starts) and end - begin < limit and (end - begin == 1 or starts[end] - starts[end - 1] == step)
        if not grows:
            yield begin, end, step
            begin = end


def _attend_chunks(q_blocks, k_blocks, v_blocks, out, s: TorchSchedule, scale, todo):
    """For each chunk number in ``todo``: read the chunk's queries (and its keys and values, in place
    or gathered into this thread's buffers), attend, and write its rows of the output."""
    bq, bk, dim = s.bq, s.bk, q_blocks.shape[1] // s.bq
    for i in todo:
        count, rows, run_start, run_step, compact, merged = s.chunks[i]
        r = rows.index
        lead = r[::merged]  # each query's first block: the rows of a query share their keys
        n = lead.numel()
        bh = lead // s.n_q
        qs = rows.read(q_blocks, "q")
        # slots: the key slots (compact) or key blocks to gather; None where the blocks are read in place
        if compact:
            slots, mask = _compact_key_slots(bh, s.counts[lead], s.offsets[lead], s.indices, s.key_len, s.n_k, bk, count)
            length, width = count, dim
        else:
            length, width = count * bk, bk * dim
            blocks = None
            if run_start is None or s.key_ok is not None:
                blocks = s.indices[s.offsets[lead][:, None] + torch.arange(count, device=r.device)]
            mask = None if s.key_ok is None else s.key_ok[bh[:, None], blocks].reshape(n, length)
            slots = None if run_start is not None else (bh[:, None] * s.n_k + blocks).reshape(-1)
        if slots is None:
            ks, vs = (_run_view(x, run_start, run_step, n, count) for x in (k_blocks, v_blocks))
        else:
            ks, vs = (
                torch.index_select(x.view(-1, width), 0, slots, out=_buffer(name, (s.most_keys,), x)[: slots.numel() * width].view(-1, width))
                for name, x in (("k", k_blocks), ("v", v_blocks))
            )
        if mask is not None:
            # an additive mask: the CPU kernel converts a boolean one on every call
            mask = None if bool(mask.all()) else qs.new_zeros(n, 1, 1, length).masked_fill_(~mask.view(n, 1, 1, length), -math.inf)
        o = F.scaled_dot_product_attention(
            qs.view(n, 1, merged * bq, dim), ks.view(n, 1, length, dim), vs.view(n, 1, length, dim), attn_mask=mask, scale=scale,
        )
        rows.write(out, o)


def _compact_key_slots(bh, row_counts, row_offsets, indices, key_len, n_k, bk, length):
    """Where each of ``n`` rows' keys are in the block-major key slots, its blocks' valid keys one
    after another: ``[n * length]`` slot numbers and ``[n, length]`` whether the slot is one of
    the row's keys (the rest is padding to ``length``)."""
    width = int(row_counts.max())
    j = torch.arange(width, device=bh.device)
    takes = j < row_counts[:, None]
    blocks = torch.where(takes, indices[(row_offsets[:, None] + j).clamp(max=indices.numel() - 1)], 0)
    lens = torch.where(takes, key_len[bh[:, None], blocks], 0)                    # [n, width]
    ends = lens.cumsum(1)
    t = torch.arange(length, device=bh.device).expand(len(bh), -1).contiguous()
    which = torch.searchsorted(ends, t, right=True)                               # the row's block of key t
    real = which < width
    which = which.clamp(max=width - 1)
    within = t - (ends - lens).gather(1, which)
    slots = (bh[:, None] * n_k + blocks.gather(1, which)) * bk + within
    return torch.where(real, slots, 0).reshape(-1), real


def _run_view(blocks: torch.Tensor, start: int, step: int, n: int, count: int) -> torch.Tensor:
    """``[n, count * block * D]`` over the rows of ``blocks`` ``[N, block * D]``, without a copy:
    entry ``i`` holds rows ``start + i * step`` onwards (entries overlap when ``step < count``)."""
    row = blocks.shape[1]
    return blocks.as_strided((n, count * row), (step * row, 1), blocks.storage_offset() + start * row)


def _gather_rows(x: torch.Tensor, index: torch.Tensor, name: str) -> torch.Tensor:
    """``x.reshape(-1, D)[index]`` in this thread's buffer ``name``, kept across calls: a fresh
    tensor of this size costs its page faults on every call."""
    dim = x.shape[-1]
    return torch.index_select(x.contiguous().view(-1, dim), 0, index, out=_buffer(name, (index.numel(), dim), x))


_BUFFERS = threading.local()


def _buffer(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor of ``shape``: a view of a flat buffer kept per thread, dtype and device, so
    that chunks and calls reuse it (never shared between threads)."""
    store = _BUFFERS.__dict__.setdefault("store", {})
    key = (name, like.dtype, like.device)
    elements = math.prod(shape)
    buf = store.get(key)
    if buf is None or buf.numel() < elements:
        buf = store[key] = like.new_empty(elements)
    return buf[:elements].view(shape)


@contextmanager
def _single_threaded_ops():
    """Each op on one thread while chunks run in parallel on the pool: many small ops scale badly
    (and collapse on a loaded machine) when each one forks and joins all intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dit-sparse")


class _FullCall(NamedTuple):
    """Query blocks of the heads ``group`` that attend every key block: one SDPA over the first
    ``length`` keys of those heads, in place."""

    group: torch.Tensor
    rows: _BlockRows
    length: int


def _full_calls(full: torch.Tensor, limit: torch.Tensor, heads: int, n_q: int) -> list[_FullCall]:
    """Heads whose every query block is full and whose batch elements have as many valid keys in one
    call; each other head's full query blocks in a call of its own."""
    full = full.view(-1, n_q)
    valid = limit.repeat_interleave(heads)
    whole = full.all(-1)
    blocks = torch.arange(n_q, device=full.device)
    calls = [(group, (group[:, None] * n_q + blocks).reshape(-1))
             for group in (torch.nonzero(whole & (valid == n)).squeeze(1) for n in torch.unique(valid[whole]).tolist())]
    calls += [(bh[None], torch.nonzero(full[bh]).squeeze(1) + bh * n_q) for bh in torch.nonzero(full.any(-1) & ~whole).squeeze(1)]
    return [_FullCall(group, _BlockRows.of(rows), int(valid[group[0]])) for group, rows in calls]


def _attend_full_rows(q_blocks, k_blocks, v_blocks, out, s: TorchSchedule, scale) -> None:
    """Each of the schedule's full calls: its query blocks over their heads' valid keys in place (in
    plan order a prefix)."""
    dim = q_blocks.shape[1] // s.bq
    keys = k_blocks.view(-1, s.n_k * s.bk, dim)
    values = v_blocks.view_as(keys)
    for group, rows, length in s.full_calls:
        qs = rows.read(q_blocks, "q").view(1, len(group), -1, dim)
        rows.write(out, F.scaled_dot_product_attention(qs, _heads(keys, group, length), _heads(values, group, length), scale=scale))


def _heads(x: torch.Tensor, group: torch.Tensor, length: int) -> torch.Tensor:
    """``x[group, :length]`` as ``[1, G, length, D]``: a view when the heads are consecutive."""
    first, last = int(group[0]), int(group[-1])
    if last - first + 1 == len(group):
        return x[first : last + 1, :length][None]
    return x[group, :length][None]


def _valid_limit(batch: int, seq: int, kv_valid_len, device) -> torch.Tensor:
    """``[B]``: how many keys (a prefix in plan order) each batch element may attend."""
    limit = torch.full((batch,), seq, dtype=torch.long, device=device)
    if kv_valid_len is not None:
        limit = torch.clamp(kv_valid_len.to(device).long(), max=seq)
    return limit


def _row_sums(counts, offsets, indices, per_block, rows_per_head) -> torch.Tensor:
    """``per_block`` (``[B*H, n_k]``) summed over each row's key blocks: with the valid keys of
    each block, how many valid keys a row attends (text padding can leave a row with none)."""
    row_ids = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    ends = torch.cumsum(counts, 0)
    rank = torch.arange(row_ids.numel(), device=counts.device) - (ends - counts)[row_ids]
    blocks = indices[offsets.reshape(-1)[row_ids] + rank]
    values = per_block[row_ids // rows_per_head, blocks].long()
    return torch.zeros_like(counts).index_add_(0, row_ids, values)
