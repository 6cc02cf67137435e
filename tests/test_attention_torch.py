import pytest
import torch
import torch.nn.functional as F

from dit_sparse import BlockSparsePlan, TokenLayout, sparse_attention
from random_plans import random_plan

CASES = [
    # grid, text_len, text_first, valid_text_len, batch, block_size
    ((5, 10, 20), 0, False, None, 1, 64),          # 1000 tokens, blocks of 64: a partial last block
    ((3, 9, 13), 0, False, None, 2, 64),
    ((2, 7, 11), 13, False, None, 1, 32),
    ((2, 7, 11), 13, True, None, 2, 32),
    ((3, 6, 10), 21, False, (21, 5), 2, 64),       # HunyuanVideo-style padded text
    ((3, 6, 10), 21, True, (3, 21), 2, (64, 32)),
    ((4, 8, 8), 7, True, None, 2, (32, 64)),
]


def qkv(layout, heads, batch, dim=32, dtype=torch.float32):
    return [torch.randn(batch, layout.seq_len, heads, dim).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_backend_matches_reference_fp32(case, seed):
    grid, text_len, text_first, valid, batch, block = case
    layout = TokenLayout(grid, text_len, text_first, valid)
    plan = random_plan(layout, heads=3, block_size=block, batch=batch, density=0.1 + 0.2 * seed, empty_rows=2, seed=seed)
    q, k, v = qkv(layout, 3, batch)
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    out = sparse_attention(q, k, v, plan, backend="torch")
    assert out.shape == q.shape and not out.isnan().any()
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("case", CASES[::2])
def test_torch_backend_matches_reference_half(case, dtype, tol):
    grid, text_len, text_first, valid, batch, block = case
    layout = TokenLayout(grid, text_len, text_first, valid)
    plan = random_plan(layout, heads=2, block_size=block, batch=batch, empty_rows=1, seed=7)
    q, k, v = qkv(layout, 2, batch, dtype=dtype)
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    out = sparse_attention(q, k, v, plan, backend="torch")
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_batch_elements_get_their_own_plans():
    layout = TokenLayout((3, 8, 8), text_len=5)
    plans = [random_plan(layout, heads=2, block_size=32, density=d, seed=s) for d, s in ((0.2, 1), (0.6, 2))]
    both = BlockSparsePlan.concat_batch(plans)
    q, k, v = qkv(layout, 2, 2)
    out = sparse_attention(q, k, v, both, backend="torch")
    for b, plan in enumerate(plans):
        alone = sparse_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], plan, backend="torch_reference")
        assert (out[b : b + 1] - alone).abs().max() <= 1e-5


def test_plan_of_batch_one_is_shared():
    layout = TokenLayout((2, 8, 8))
    plan = random_plan(layout, heads=2, block_size=16, seed=4)
    q, k, v = qkv(layout, 2, 3)
    out = sparse_attention(q, k, v, plan, backend="torch")
    for b in range(3):
        one = sparse_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], plan, backend="torch_reference")
        assert (out[b : b + 1] - one).abs().max() <= 1e-5


@pytest.mark.parametrize("grid,text_len,block", [((5, 10, 20), 0, 64), ((3, 6, 10), 17, 64), ((2, 7, 9), 5, (32, 16))])
def test_full_plan_equals_plain_sdpa(grid, text_len, block):
    layout = TokenLayout(grid, text_len)
    bq, bk = (block, block) if isinstance(block, int) else block
    mask = torch.ones(4, layout.num_blocks(bq), layout.num_blocks(bk), dtype=torch.bool)
    plan = BlockSparsePlan.from_block_mask(mask, layout, block, q_order=layout.tile_order((1, 4, 4)))
    q, k, v = qkv(layout, 4, 2)
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    for backend in ("torch", "torch_reference"):
        assert (sparse_attention(q, k, v, plan, backend=backend) - expected).abs().max() <= 1e-5


def test_rows_without_keys_give_zeros():
    layout = TokenLayout((2, 8, 8))
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = False
    plan = BlockSparsePlan.from_block_mask(mask, layout, 32)
    q, k, v = qkv(layout, 2, 1)
    out = sparse_attention(q, k, v, plan, backend="torch")
    assert out[0, 64:96, 1].eq(0).all() and out[0, 64:96, 0].abs().sum() > 0
    assert not out.isnan().any()


def test_rows_whose_only_keys_are_padding_give_zeros():
    layout = TokenLayout((1, 4, 8), text_len=32, valid_text_len=(0,))
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)  # video rows keep no video block; text is all padding
    plan = BlockSparsePlan.from_block_mask(mask, layout, 32)
    q, k, v = qkv(layout, 1, 1)
    out = sparse_attention(q, k, v, plan, backend="torch")
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    assert out[0, :32].eq(0).all() and not out.isnan().any()
    assert (out - ref).abs().max() <= 1e-5


def test_schedule_is_derived_once_per_plan_and_again_for_new_text_padding(monkeypatch):
    """The torch backend works out what depends on the plan alone once (cached on the plan): later
    calls with new q, k, v reuse it, a plan for new text padding gets its own, and every output
    equals the reference."""
    import dit_sparse.kernels.block_sparse_attention_torch as torch_kernel

    built = []
    schedule = torch_kernel.torch_schedule
    monkeypatch.setattr(torch_kernel, "torch_schedule", lambda *a, **kw: built.append(a[-1]) or schedule(*a, **kw))
    layout = TokenLayout((3, 6, 10), 21, False, (21, 5))
    plan = random_plan(layout, heads=2, block_size=32, batch=2, density=0.4, empty_rows=1, seed=4)
    repadded = plan.with_layout(layout.with_valid_text_len((9, 0)))
    for p in (plan, plan, repadded, repadded, plan):
        q, k, v = qkv(layout, 2, 2)
        ref = sparse_attention(q, k, v, p, backend="torch_reference")
        assert (sparse_attention(q, k, v, p, backend="torch") - ref).abs().max() <= 1e-5
    assert len(built) == 2


@pytest.mark.parametrize("variable_keys", [False, True])
def test_query_blocks_that_share_their_key_blocks_are_one_query(variable_keys, monkeypatch):
    """Query blocks of a head that attend the same scattered key blocks (as a query cluster's blocks
    do) run as one longer query in pieces of 1, 2, 4, 8 blocks; the result equals the reference."""
    import dit_sparse.kernels.block_sparse_attention_torch as torch_kernel

    queries = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: queries.append(q.shape[2]) or sdpa(q, *a, **kw))
    layout = TokenLayout((4, 16, 16), 16, False, (9,))
    n_q = layout.num_blocks(32)
    g = torch.Generator().manual_seed(2)
    kv_starts = None
    n_k = n_q
    if variable_keys:
        ends = torch.randint(1, 33, (120,), generator=g).cumsum(0)
        kv_starts = torch.cat([torch.zeros(1, dtype=torch.long), ends[ends < layout.seq_len], torch.tensor([layout.seq_len])])
        n_k = kv_starts.numel() - 1
    key_sets = torch.rand(3, n_k, generator=g) < 0.3  # three scattered key sets, each some query blocks'
    key_sets[:, 0] = True
    which = torch.randint(0, 3, (2, n_q), generator=g)
    mask = key_sets[which]
    plan = BlockSparsePlan.from_block_mask(
        mask[None], layout, 32, q_order=layout.tile_order((1, 4, 4)), kv_starts=None if kv_starts is None else kv_starts.view(1, 1, -1)
    )
    q, k, v = qkv(layout, 2, 2)
    out = sparse_attention(q, k, v, plan, backend="torch")
    assert max(queries) == torch_kernel.MOST_MERGED * 32
    assert (out - sparse_attention(q, k, v, plan, backend="torch_reference")).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, k, v: (q[:, :-1], k[:, :-1], v[:, :-1]), "plan is for 128 tokens"),
        (lambda q, k, v: (q[:, :, :1], k[:, :, :1], v[:, :, :1]), "heads"),
        (lambda q, k, v: (q, k[:, :-1], v), "share one"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), "fp32, fp16 and bf16"),
    ],
)
def test_bad_inputs_are_rejected(change, match):
    layout = TokenLayout((2, 8, 8))
    plan = random_plan(layout, heads=2, block_size=32, seed=0)
    q, k, v = change(*qkv(layout, 2, 1))
    with pytest.raises((ValueError, TypeError), match=match):
        sparse_attention(q, k, v, plan, backend="torch")


def test_batch_size_mismatch_and_unknown_backend():
    layout = TokenLayout((2, 8, 8))
    plan = random_plan(layout, heads=2, block_size=32, batch=2, seed=0)
    q, k, v = qkv(layout, 2, 3)
    with pytest.raises(ValueError, match="batch size 2"):
        sparse_attention(q, k, v, plan)
    with pytest.raises(ValueError, match="unknown attention backend"):
        sparse_attention(q[:2], k[:2], v[:2], plan, backend="cuda-magic")


@pytest.mark.parametrize("threads", [1, 3])
def test_torch_backend_is_exact_on_any_thread_count(threads, monkeypatch):
    import dit_sparse.kernels.block_sparse_attention_torch as torch_kernel

    monkeypatch.setattr(torch_kernel, "CHUNK_ELEMENTS", 1 << 14)  # many chunks: every worker gets some
    layout = TokenLayout((3, 6, 10), 21, False, (21, 5))
    plan = random_plan(layout, heads=3, block_size=32, batch=2, density=0.3, empty_rows=2, seed=11)
    q, k, v = qkv(layout, 3, 2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = sparse_attention(q, k, v, plan, backend="torch")
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("block", [32, (32, 16)])
def test_rows_whose_key_blocks_are_one_run_read_them_in_place(block, monkeypatch):
    """Band rows (one run of key blocks each; runs 0, 1 and 2 blocks apart, and broken runs) take the
    strided in-place path, and still equal the reference."""
    import dit_sparse.kernels.block_sparse_attention_torch as torch_kernel

    views = []
    run_view = torch_kernel._run_view
    monkeypatch.setattr(torch_kernel, "_run_view", lambda *args: views.append(args[2]) or run_view(*args))
    monkeypatch.setattr(torch_kernel, "CHUNK_ELEMENTS", 1 << 14)
    layout = TokenLayout((4, 8, 8))
    bq, bk = (block, block) if isinstance(block, int) else block
    n_q, n_k = layout.num_blocks(bq), layout.num_blocks(bk)
    rows = torch.arange(n_q)
    starts = torch.stack([rows // 2, rows, 2 * rows]).clamp(max=n_k - 3)
    mask = (torch.arange(n_k) >= starts[..., None]) & (torch.arange(n_k) < starts[..., None] + 3)
    mask[2, 5, 0] = True  # a row of two runs: gathered
    plan = BlockSparsePlan.from_block_mask(mask[None], layout, block, q_order=layout.tile_order((1, 4, 4)))
    q, k, v = qkv(layout, 3, 2)
    out = sparse_attention(q, k, v, plan, backend="torch")
    assert {0, 1, 2} <= set(views)
    assert (out - sparse_attention(q, k, v, plan, backend="torch_reference")).abs().max() <= 1e-5


@pytest.mark.parametrize("valid_text", [None, (5,)])
def test_variable_key_blocks_cost_their_keys_not_their_slots(valid_text, monkeypatch):
    """Key blocks of a quarter of the slot (and empty ones) are gathered key by key: the batched
    calls see at most the keys the rows attend plus padding to each chunk's longest row, far below
    the slots, and still equal the reference (with text-padding masks too)."""
    import dit_sparse.kernels.block_sparse_attention_torch as torch_kernel

    keys_seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, *a, **kw: keys_seen.append(k.shape[0] * k.shape[2]) or sdpa(q, k, *a, **kw))
    monkeypatch.setattr(torch_kernel, "CHUNK_ELEMENTS", 1 << 13)
    layout = TokenLayout((4, 8, 8), 16, False, valid_text)
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 17, (200,), generator=g)  # blocks of 0 to 16 keys in slots of 64
    ends = lengths.cumsum(0)
    kv_starts = torch.cat([torch.zeros(1, dtype=torch.long), ends[ends < layout.seq_len], torch.tensor([layout.seq_len])])
    n_k = kv_starts.numel() - 1
    mask = torch.rand(2, layout.num_blocks(64), n_k, generator=g) < 0.3
    mask[:, :, 0] = True
    plan = BlockSparsePlan.from_block_mask(mask[None], layout, 64, kv_starts=kv_starts.view(1, 1, -1))
    q, k, v = qkv(layout, 2, 1)
    out = sparse_attention(q, k, v, plan, backend="torch")
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    assert (out - ref).abs().max() <= 1e-5
    slots = int(mask.sum()) * 64
    assert sum(keys_seen) <= slots / 3
