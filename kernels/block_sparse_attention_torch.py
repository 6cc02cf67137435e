"""Block-sparse attention in PyTorch: the CPU fast path (and the fallback wherever Triton is absent).

Only the kept blocks are computed. Query blocks are grouped by how many key blocks they attend;
for a chunk of query blocks with the same count, their queries and their key and value blocks are
gathered into small per-thread buffers (sized to stay in cache, reused across chunks and calls) and
one batched ``scaled_dot_product_attention`` runs over them; the chunk's output is written straight
to its rows of the result. Query blocks that attend every key block attend the keys in place, and so
do chunks of rows whose key blocks are one run each, starting equally far apart (a strided view).

The token gathers into each head's order are part of the kernel: ``q_rows`` and ``kv_rows`` say
which row of ``x.reshape(-1, D)`` holds each (batch, head, position in the plan's order), so inputs
in diffusers' ``(B, S, H, D)`` layout need no head-major copy, and the output comes back in ``q``'s
layout. Keys and values are gathered once, into block-major buffers kept per thread across calls;
queries chunk by chunk.

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
) -> torch.Tensor:
    """Block-sparse softmax attention; query blocks with no (valid) key give zeros.

    Returns a tensor shaped like ``q`` in ``q``'s dtype: ``[B, H, S, D]`` in the plan's order, or,
    with ``q_rows``, each result in the row its query came from.

    Example::

        >>> q = k = v = torch.randn(1, 1, 100, 16)
        >>> counts = torch.tensor([[[1, 2]]]); offsets = torch.tensor([[[0, 1]]])
        >>> out = block_sparse_attention_torch(q, k, v, counts, offsets, torch.tensor([0, 0, 1]), 64, 64)
        >>> out.shape
        torch.Size([1, 1, 100, 16])
    """
    dim = q.shape[-1]
    q_rows = _identity_rows(q) if q_rows is None else q_rows
    batch, heads, seq = q_rows.shape
    bq, bk = block_size_q, block_size_k
    n_q = -(-seq // bq) if q_starts is None else q_starts.shape[-1] - 1
    n_k = -(-seq // bk) if kv_starts is None else kv_starts.shape[-1] - 1
    counts = kv_counts.expand(batch, -1, -1).reshape(-1).long()
    offsets = kv_offsets.expand(batch, -1, -1).reshape(-1)
    indices = kv_indices.long()

    q_src = q.contiguous().view(-1, dim)
    rows_out = q_src.shape[0]
    # positions past a block's end read any real row and write to a spare row past the end of the output
    q_pos, q_real = _block_positions(q_starts, batch, heads, seq, n_q, bq, q.device)
    q_index = q_rows.reshape(batch * heads, seq).gather(1, q_pos)
    out_index = torch.where(q_real, q_index, rows_out).view(batch * heads * n_q, bq)
    q_index = q_index.view(batch * heads * n_q, bq)
    kv_pos, kv_real = _block_positions(kv_starts, batch, heads, seq, n_k, bk, q.device)
    if kv_rows is None and seq == n_k * bk and kv_starts is None:
        k_blocks, v_blocks = (x.contiguous().view(batch * heads * n_k, bk * dim) for x in (k, v))
    else:
        kv_rows = _identity_rows(k) if kv_rows is None else kv_rows
        kv_index = kv_rows.reshape(batch * heads, seq).gather(1, kv_pos).reshape(-1)
        k_blocks, v_blocks = (
            _gather_rows(x, kv_index, name).view(batch * heads * n_k, bk * dim) for name, x in (("k_blocks", k), ("v_blocks", v))
        )
    limit = _valid_limit(batch, seq, kv_valid_len, q.device)
    key_ok = (kv_real & (kv_pos < limit.repeat_interleave(heads)[:, None])).view(batch * heads, n_k, bk)

    live = counts > 0
    if q_starts is not None:
        live &= q_real.view(-1, bq).any(-1)
    key_len = row_keys = None
    if kv_valid_len is not None or kv_starts is not None:
        key_len = key_ok.sum(-1)  # valid keys of each block: a prefix of its slots
        row_keys = _row_sums(counts, offsets, indices, key_len, n_q)
        live &= row_keys > 0

    out = q_src.new_empty(rows_out + 1, dim)
    dead = torch.nonzero(~live).squeeze(1)
    if dead.numel():
        out.index_fill_(0, out_index[dead].reshape(-1), 0)
    # rows that attend every key block attend the keys in place, a prefix in plan order (not so when
    # variable key blocks leave gaps: those rows take the gathered path)
    full = live & (counts == n_k) & (kv_starts is None)
    _attend_full_rows(q_src, q_index, out_index, k_blocks, v_blocks, limit, full, out, heads, n_q, scale)

    sparse_rows = torch.nonzero(live & ~full).squeeze(1)
    if sparse_rows.numel():
        if kv_starts is not None:
            chunks = _compact_chunks(sparse_rows, row_keys[sparse_rows], dim)
        else:
            row_counts = counts[sparse_rows]
            first, last = (indices[offsets[sparse_rows] + i] for i in (0, row_counts - 1))
            # rows whose key blocks are one run read them in place: a chunk of such rows whose runs start
            # a constant number of blocks apart is a strided view of the key (and value) blocks
            run_starts = torch.where(last - first + 1 == row_counts, sparse_rows // n_q * n_k + first, -1)
            chunks = _chunks(sparse_rows, row_counts, run_starts, bk * dim)
        work = partial(
            _attend_chunks, q_src, q_index, out_index, k_blocks, v_blocks, None if bool(key_ok.all()) else key_ok,
            key_len, counts, offsets, indices, out, n_q, n_k, bk, scale, chunks,
        )
        workers = min(torch.get_num_threads(), len(chunks)) if q.device.type == "cpu" else 1
        if workers == 1:
            work(iter(range(len(chunks))))
        else:
            # each worker takes the next chunk when it is free: a worker descheduled by another job
            # on the machine holds up one chunk, not a fixed share of them
            shared = _SharedCounter(len(chunks))
            with _single_threaded_ops():
                list(_pool(workers).map(lambda _: work(shared), range(workers)))
    return out[:rows_out].view(q.shape)


def _identity_rows(x: torch.Tensor) -> torch.Tensor:
    batch, heads, seq, _ = x.shape
    return torch.arange(batch * heads * seq, device=x.device).view(batch, heads, seq)


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


class _Chunk(NamedTuple):
    """Query-block rows that each attend ``count`` key blocks, computed in one batched call. With
    ``run_start`` set, row ``i``'s key blocks are blocks ``run_start + i * run_step ..`` of the
    block-major keys, read in place; otherwise they are gathered. A ``compact`` chunk's rows attend
    at most ``count`` keys each, gathered key by key (variable key blocks)."""

    count: int
    rows: torch.Tensor
    run_start: int | None = None
    run_step: int = 0
    compact: bool = False

    def key_elements(self, block_elements: int, dim: int) -> int:
        """Elements of the chunk's gathered keys (0 when they are read in place)."""
        if self.run_start is not None:
            return 0
        return self.rows.numel() * self.count * (dim if self.compact else block_elements)


def _chunks(rows: torch.Tensor, counts: torch.Tensor, run_starts: torch.Tensor, block_elements: int) -> list[_Chunk]:
    """Rows grouped by key-block count, cut so that each chunk holds about CHUNK_ELEMENTS of keys;
    the largest counts first. Rows whose key blocks are one run (``run_starts`` >= 0: the run's
    first block in the block-major keys) go in chunks whose runs start equally far apart."""
    order = torch.argsort(-counts * (run_starts.max() + 2) + run_starts, stable=True)
    chunks = []
    for count, group, starts in _groups(rows[order], counts[order], run_starts[order]):
        per_chunk = max(1, CHUNK_ELEMENTS // (count * block_elements))
        if starts is None:
            chunks.extend(_Chunk(count, r) for r in torch.split(group, per_chunk))
        else:
            chunks.extend(_Chunk(count, group[b:e], starts[b], step) for b, e, step in _equal_steps(starts, per_chunk))
    return chunks


def _compact_chunks(rows: torch.Tensor, keys: torch.Tensor, dim: int) -> list[_Chunk]:
    """Rows sorted by how many keys they attend (the most first), cut so that each chunk holds about
    CHUNK_ELEMENTS of keys with every row padded to the chunk's longest."""
    order = torch.argsort(keys, descending=True, stable=True)
    rows, keys = rows[order], keys[order].tolist()
    chunks, begin = [], 0
    while begin < len(keys):
        end = min(len(keys), begin + max(1, CHUNK_ELEMENTS // (keys[begin] * dim)))
        chunks.append(_Chunk(keys[begin], rows[begin:end], compact=True))
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


def _attend_chunks(
    q_src, q_index, out_index, k_blocks, v_blocks, key_ok, key_len, counts, offsets, indices, out, n_q, n_k, bk,
    scale, chunks, todo,
):
    """For each chunk number in ``todo``: gather the chunk's queries (and, unless they are read in
    place, its keys and values) into this thread's buffers, attend, and write its rows of the
    output. ``key_ok`` is ``None`` when every key slot is valid."""
    bq, dim = q_index.shape[1], q_src.shape[1]
    most_rows = max(c.rows.numel() for c in chunks)
    most_keys = max(c.key_elements(bk * dim, dim) for c in chunks)
    for i in todo:
        count, r, run_start, run_step, compact = chunks[i]
        n = r.numel()
        bh = r // n_q
        qs = torch.index_select(q_src, 0, q_index[r].reshape(-1), out=_buffer("q", (most_rows * bq, dim), q_src)[: n * bq])
        # rows: the key slots (compact) or key blocks to gather; None where the blocks are read in place
        if compact:
            rows, mask = _compact_key_slots(bh, counts[r], offsets[r], indices, key_len, n_k, bk, count)
            length, width = count, dim
        else:
            length, width = count * bk, bk * dim
            blocks = None
            if run_start is None or key_ok is not None:
                blocks = indices[offsets[r][:, None] + torch.arange(count, device=r.device)]
            mask = None if key_ok is None else key_ok[bh[:, None], blocks].reshape(n, length)
            rows = None if run_start is not None else (bh[:, None] * n_k + blocks).reshape(-1)
        if rows is None:
            ks, vs = (_run_view(x, run_start, run_step, n, count) for x in (k_blocks, v_blocks))
        else:
            ks, vs = (
                torch.index_select(x.view(-1, width), 0, rows, out=_buffer(name, (most_keys,), x)[: rows.numel() * width].view(-1, width))
                for name, x in (("k", k_blocks), ("v", v_blocks))
            )
        mask = None if mask is None or bool(mask.all()) else mask.view(n, 1, 1, length)
        o = F.scaled_dot_product_attention(
            qs.view(n, 1, bq, dim), ks.view(n, 1, length, dim), vs.view(n, 1, length, dim), attn_mask=mask, scale=scale,
        )
        out.index_copy_(0, out_index[r].reshape(-1), o.view(n * bq, dim))


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


def _attend_full_rows(q_src, q_index, out_index, k_blocks, v_blocks, limit, full, out, heads, n_q, scale):
    """Rows that attend every key block, over the valid keys in place (in plan order they are a
    prefix): heads whose every row is full and whose batch elements have as many valid keys in one
    SDPA call, each other head in a call of its own."""
    if not bool(full.any()):
        return
    dim = q_src.shape[1]
    keys = k_blocks.view(full.numel() // n_q, -1, dim)
    values = v_blocks.view_as(keys)
    full = full.view(-1, n_q)
    valid = limit.repeat_interleave(heads)
    whole = full.all(-1)
    blocks = torch.arange(n_q, device=full.device)
    calls = [(group, (group[:, None] * n_q + blocks).reshape(-1))
             for group in (torch.nonzero(whole & (valid == n)).squeeze(1) for n in torch.unique(valid[whole]).tolist())]
    calls += [(bh[None], torch.nonzero(full[bh]).squeeze(1) + bh * n_q) for bh in torch.nonzero(full.any(-1) & ~whole).squeeze(1)]
    for group, rows in calls:
        n = int(valid[group[0]])
        qs = q_src.index_select(0, q_index[rows].reshape(-1)).view(1, len(group), -1, dim)
        o = F.scaled_dot_product_attention(qs, _heads(keys, group, n), _heads(values, group, n), scale=scale)
        out.index_copy_(0, out_index[rows].reshape(-1), o.view(-1, dim))


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
