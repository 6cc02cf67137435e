"""Block-sparse attention in PyTorch: the CPU fast path (and the fallback wherever Triton is absent).

Only the kept blocks are computed. Query blocks are grouped by how many key blocks they attend;
for a chunk of query blocks with the same count, their key and value blocks are gathered into small
reused buffers (sized to stay in cache) and one batched ``scaled_dot_product_attention`` runs over
them. Query blocks that attend every key block skip the gather and attend the keys in place.

Layouts (all tensors contiguous, the sequence already in the plan's token order):
    q, k, v      [B, H, S, D]
    kv_counts    [Bp, H, nQ] int   (Bp = B, or 1 to share one plan across the batch)
    kv_offsets   [Bp, H, nQ] int   start of each row in kv_indices
    kv_indices   [nnz] int         sorted key block indices of every row, rows concatenated
    kv_valid_len [B] int or None   keys at positions >= kv_valid_len[b] are masked out
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache, partial

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
) -> torch.Tensor:
    """Block-sparse softmax attention; query blocks with no (valid) key give zeros.

    Returns ``[B, H, S, D]`` in ``q``'s dtype.

    Example::

        >>> q = k = v = torch.randn(1, 1, 100, 16)
        >>> counts = torch.tensor([[[1, 2]]]); offsets = torch.tensor([[[0, 1]]])
        >>> out = block_sparse_attention_torch(q, k, v, counts, offsets, torch.tensor([0, 0, 1]), 64, 64)
        >>> out.shape
        torch.Size([1, 1, 100, 16])
    """
    batch, heads, seq, dim = q.shape
    bq, bk = block_size_q, block_size_k
    n_q, n_k = -(-seq // bq), -(-seq // bk)
    counts = kv_counts.expand(batch, -1, -1).reshape(-1).long()
    offsets = kv_offsets.expand(batch, -1, -1).reshape(-1)
    indices = kv_indices.long()

    q_blocks = _pad_seq(q, n_q * bq).view(batch * heads * n_q, bq, dim)
    k_blocks = _pad_seq(k, n_k * bk).view(batch * heads * n_k, bk * dim)
    v_blocks = _pad_seq(v, n_k * bk).view(batch * heads * n_k, bk * dim)
    key_ok = _valid_keys(batch, seq, n_k * bk, kv_valid_len, q.device).view(batch, n_k, bk)

    live = counts > 0
    if kv_valid_len is not None:
        live &= _attends_valid_key(counts, offsets, indices, key_ok.any(-1), heads * n_q)

    out = torch.zeros(batch * heads * n_q, bq, dim, dtype=q.dtype, device=q.device)
    full = live & (counts == n_k)
    _attend_full_rows(q_blocks, k, v, key_ok, full, out, heads, n_q, scale)

    sparse_rows = torch.nonzero(live & ~full).squeeze(1)
    if sparse_rows.numel():
        chunks = _chunks(sparse_rows, counts[sparse_rows], bk * dim)
        work = partial(
            _attend_gathered, q_blocks, k_blocks, v_blocks, key_ok, offsets, indices, out, heads, n_q, n_k, scale
        )
        workers = min(torch.get_num_threads(), len(chunks)) if q.device.type == "cpu" else 1
        if workers == 1:
            work(chunks)
        else:
            with _single_threaded_ops():
                list(_pool(workers).map(work, [chunks[i::workers] for i in range(workers)]))
    return out.view(batch, heads, n_q * bq, dim)[:, :, :seq]


def _chunks(rows: torch.Tensor, counts: torch.Tensor, block_elements: int) -> list[tuple[int, torch.Tensor]]:
    """Rows grouped by key-block count, cut so that each chunk gathers about CHUNK_ELEMENTS."""
    order = torch.argsort(counts, stable=True)
    rows, counts = rows[order], counts[order]
    values, sizes = torch.unique_consecutive(counts, return_counts=True)
    chunks = []
    for count, group in zip(values.tolist(), torch.split(rows, sizes.tolist())):
        per_chunk = max(1, CHUNK_ELEMENTS // (count * block_elements))
        chunks.extend((count, r) for r in torch.split(group, per_chunk))
    return chunks


def _attend_gathered(q_blocks, k_blocks, v_blocks, key_ok, offsets, indices, out, heads, n_q, n_k, scale, chunks):
    """For each chunk of rows that attend ``count`` key blocks each: gather their key and value
    blocks into buffers reused across chunks, and attend."""
    bk, dim = key_ok.shape[-1], q_blocks.shape[-1]
    size = max(count * r.numel() for count, r in chunks)
    k_buf = k_blocks.new_empty(size, k_blocks.shape[1])
    v_buf = torch.empty_like(k_buf)
    for count, r in chunks:
        n = r.numel()
        blocks = indices[offsets[r][:, None] + torch.arange(count, device=r.device)]
        bh = r // n_q
        src = (bh[:, None] * n_k + blocks).reshape(-1)
        ks, vs = k_buf[: n * count], v_buf[: n * count]
        torch.index_select(k_blocks, 0, src, out=ks)
        torch.index_select(v_blocks, 0, src, out=vs)
        mask = key_ok[(bh // heads)[:, None], blocks]
        mask = None if bool(mask.all()) else mask.reshape(n, 1, 1, count * bk)
        o = F.scaled_dot_product_attention(
            q_blocks[r].unsqueeze(1), ks.view(n, 1, count * bk, dim), vs.view(n, 1, count * bk, dim),
            attn_mask=mask, scale=scale,
        )
        out.index_copy_(0, r, o.squeeze(1))


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


def _attend_full_rows(q_blocks, k, v, key_ok, full, out, heads, n_q, scale):
    """Rows that attend every key block: one SDPA per (batch, head) over the keys in place."""
    if not bool(full.any()):
        return
    batch, _, seq, dim = k.shape
    bq = q_blocks.shape[1]
    full = full.view(batch * heads, n_q)
    for bh in torch.nonzero(full.any(-1)).squeeze(1).tolist():
        rows = torch.nonzero(full[bh]).squeeze(1) + bh * n_q
        b, h = divmod(bh, heads)
        mask = key_ok[b].reshape(-1)[:seq]
        mask = None if bool(mask.all()) else mask.view(1, 1, 1, seq)
        o = F.scaled_dot_product_attention(
            q_blocks[rows].reshape(1, 1, -1, dim), k[b, h][None, None], v[b, h][None, None],
            attn_mask=mask, scale=scale,
        )
        out.index_copy_(0, rows, o.view(-1, bq, dim))


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    x = x.contiguous()
    return x if x.shape[2] == length else F.pad(x, (0, 0, 0, length - x.shape[2]))


def _valid_keys(batch: int, seq: int, padded: int, kv_valid_len, device) -> torch.Tensor:
    limit = torch.full((batch,), seq, dtype=torch.long, device=device)
    if kv_valid_len is not None:
        limit = torch.clamp(kv_valid_len.to(device).long(), max=seq)
    return torch.arange(padded, device=device)[None, :] < limit[:, None]


def _attends_valid_key(counts, offsets, indices, block_has_key, rows_per_batch) -> torch.Tensor:
    """Whether each row attends at least one valid key (text padding can leave a row with none)."""
    row_ids = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    ends = torch.cumsum(counts, 0)
    rank = torch.arange(row_ids.numel(), device=counts.device) - (ends - counts)[row_ids]
    blocks = indices[offsets.reshape(-1)[row_ids] + rank]
    hits = block_has_key[row_ids // rows_per_batch, blocks].long()
    return torch.zeros_like(counts).index_add_(0, row_ids, hits) > 0
