import pytest
import torch

from dit_sparse import SparseAttentionConfig, TokenLayout
from dit_sparse.budget import Budget, keep_heaviest
from dit_sparse.calibration import measure_block_mass
from dit_sparse.kernels.block_mass_torch import block_mass_torch
from dit_sparse.planner import build_plan


def dense_block_mass(q, k, bq, bk, valid=None):
    """[B, H, S, D] -> block mass from the full softmax matrix (small sizes only)."""
    s = q.shape[2]
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if valid is not None:
        scores = scores.masked_fill(torch.arange(s)[None, None, None, :] >= valid[:, None, None, None], float("-inf"))
    p = scores.softmax(-1)
    nq, nk = -(-s // bq), -(-s // bk)
    out = torch.zeros(*q.shape[:2], nq, nk, dtype=torch.float64)
    for i in range(nq):
        for j in range(nk):
            out[:, :, i, j] = p[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].sum(-1).mean(-1)
    return out


@pytest.mark.parametrize("seq,bq,bk", [(150, 32, 16), (128, 64, 64), (97, 16, 32)])
def test_block_mass_matches_dense_softmax(seq, bq, bk):
    q, k = torch.randn(2, 3, seq, 16), torch.randn(2, 3, seq, 16)
    valid = torch.tensor([seq, seq - 20])
    mass = block_mass_torch(q, k, bq, bk, kv_valid_len=valid)
    ref = dense_block_mass(q, k, bq, bk, valid)
    assert (mass.double() - ref).abs().max() < 1e-6
    assert torch.allclose(mass.sum(-1), torch.ones(()), atol=1e-5)
    lse = torch.logsumexp(
        (q @ k.transpose(-1, -2) * 0.25).masked_fill(torch.arange(seq) >= valid[:, None, None, None], float("-inf")), -1
    )
    assert (block_mass_torch(q, k, bq, bk, lse=lse, kv_valid_len=valid).double() - ref).abs().max() < 1e-6


def test_measure_block_mass_uses_the_order_and_padding():
    layout = TokenLayout((2, 6, 8), text_len=9, text_first=True, valid_text_len=(4,))
    q, k = torch.randn(1, layout.seq_len, 2, 16), torch.randn(1, layout.seq_len, 2, 16)
    order = layout.tile_order((1, 3, 4))
    mass = measure_block_mass(q, k, layout, 16, order=order)
    qp, kp = (x[:, order].transpose(1, 2) for x in (q, k))
    ref = dense_block_mass(qp, kp, 16, 16, valid=torch.tensor([layout.video_len + 4]))
    assert (mass.double() - ref).abs().max() < 1e-6


def test_keep_heaviest_count_and_top_p():
    mass = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.05, 0.05, 0.1, 0.8]])
    by_count = keep_heaviest(mass, Budget(density=0.5), num_keys=400, block_size=100)
    assert by_count.tolist() == [[True, False, True, False], [False, False, True, True]]
    by_mass = keep_heaviest(mass, Budget(top_p=0.85), num_keys=400, block_size=100)
    assert by_mass.tolist() == [[True, True, True, False], [False, False, True, True]]
    always = torch.tensor([False, True, False, False])
    with_text = keep_heaviest(mass, Budget(density=0.25), num_keys=400, block_size=100, always=always)
    assert with_text.tolist() == [[True, True, False, False], [False, True, False, True]]


@pytest.mark.parametrize("n,expected", [(1024, 2), (32768, 12), (16, 1)])
def test_n_power_c_budget(n, expected):
    assert Budget(alpha=4.0, exponent=0.5).blocks_per_row(n, 10_000, 64) == expected


def test_adaptive_plan_recall_matches_token_level_mass():
    layout = TokenLayout((3, 8, 8), text_len=7)
    q, k = torch.randn(2, layout.seq_len, 2, 16), torch.randn(2, layout.seq_len, 2, 16)
    config = SparseAttentionConfig(pattern="adaptive", density=0.3, block_size=32)
    plan, report = build_plan(q, k, layout, config)
    assert plan.batch_size == 2 and plan.num_heads == 2
    token_mask = plan.to_token_mask()
    p = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) * 0.25).softmax(-1)
    expected = (p * token_mask).sum(-1).mean(-1)
    assert torch.allclose(report.recall.float(), expected, atol=1e-5)
    assert torch.allclose(report.density, plan.density(per_head=True))
    assert report.family == [["adaptive", "adaptive"]] * 2
    shared, _ = build_plan(q, k, layout, config, share_batch=True)
    assert shared.batch_size == 1


@pytest.mark.parametrize("chunk_scores", [1 << 8, 1 << 26], ids=["one head and 64 rows a chunk", "GPU-sized chunks"])
def test_one_pass_over_the_scores_gives_every_orders_block_mass(chunk_scores, monkeypatch):
    from dit_sparse.calibration import measure_block_masses
    from dit_sparse.kernels import block_mass_torch

    monkeypatch.setattr(block_mass_torch, "CHUNK_SCORES", chunk_scores)

    layout = TokenLayout((3, 5, 7), text_len=9, text_first=True, valid_text_len=(4, 9))
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, layout.seq_len, 3, 8, generator=g) * 2 for _ in range(2))
    shuffled = torch.stack([layout.tile_order((1, 2, 3))] * 3)
    shuffled[1, : layout.video_len] = shuffled[1, torch.randperm(layout.video_len, generator=g)]
    orders = {
        "tile": (layout.tile_order((1, 4, 4)),) * 2,
        "position": (layout.position_order(),) * 2,
        "per head": (shuffled.expand(2, -1, -1), shuffled.flip(0).expand(2, -1, -1)),
    }
    masses = measure_block_masses(q, k, layout, (16, 32), orders, backend="torch")
    for name, (q_order, kv_order) in orders.items():
        expected = measure_block_mass(q, k, layout, (16, 32), order=q_order, kv_order=kv_order, backend="torch")
        assert torch.allclose(masses[name], expected, atol=1e-6), name


def sampled_block_mass(q, k, bq, bk, q_order, kv_order, rows, q_starts=None, kv_starts=None):
    """[B, H, S, D] in the original order -> block mass over the orders, each query block averaged
    over its queries in ``rows`` only, from the full softmax matrix (small sizes only). Variable
    blocks: ``[n + 1]`` boundaries (an empty query block's mass is zero)."""
    p = ((q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
    s = q.shape[2]

    def blocks(order, starts, size):
        if starts is None:
            return torch.argsort(order) // size, -(-s // size)
        return torch.searchsorted(starts[1:], torch.argsort(order), right=True), starts.numel() - 1

    (q_block, nq), (key_block, nk) = blocks(q_order, q_starts, bq), blocks(kv_order, kv_starts, bk)
    per_key_block = torch.zeros(*p.shape[:3], nk, dtype=torch.float64).index_add_(3, key_block, p)
    out = torch.zeros(*p.shape[:2], nq, nk, dtype=torch.float64)
    counts = torch.zeros(nq, dtype=torch.float64)
    for r in rows.tolist():
        out[:, :, q_block[r]] += per_key_block[:, :, r]
        counts[q_block[r]] += 1
    return out / counts.clamp(min=1)[:, None]


@pytest.mark.parametrize("grid, tile, cell_length", [((4, 8, 16), (1, 4, 8), 8), ((3, 10, 13), (1, 4, 4), None)])
def test_block_mass_on_sampled_queries_and_shared_cells_matches_dense_softmax(grid, tile, cell_length):
    """Three shared orders whose common cells are runs of one length (the reshape path) or, with
    partial tiles, of several (the running-sum path), a per-head order (the gather path), the
    per-head order cut into variable blocks (empty ones included), on a sample of queries."""
    from dit_sparse.calibration import sample_query_rows
    from dit_sparse.kernels.block_mass_torch import _shared_cells, block_mass_torch_orders, original_blocks
    from random_plans import random_starts

    layout = TokenLayout(grid)
    shared = [layout.tile_order(tile), layout.identity_order(), layout.position_order()]
    assert _shared_cells(shared, 32)[0] == cell_length
    q, k = torch.randn(1, 2, layout.seq_len, 16), torch.randn(1, 2, layout.seq_len, 16)
    per_head = torch.stack([torch.randperm(layout.seq_len) for _ in range(2)])[None]
    g = torch.Generator().manual_seed(1)
    starts = (random_starts(layout, 32, 2, 1, g), random_starts(layout, 32, 2, 1, g))
    orders = [(order, order) for order in shared] + [(per_head, per_head), (per_head, per_head, *starts)]
    q_blocks = [original_blocks(o[0], o[2] if len(o) == 4 else None, 32, 1, 2) for o in orders]
    rows = sample_query_rows(layout.seq_len, 32, q_blocks, rows_per_block=4, seed=3)
    assert rows.numel() < layout.seq_len
    masses = block_mass_torch_orders(q, k, 32, 32, orders, query_rows=rows)
    for order, mass in zip(orders, masses):
        for h in range(2):
            qo, ko = (o.expand(1, 2, -1)[0, h] for o in order[:2])
            bounds = {} if len(order) == 2 else {"q_starts": starts[0][0, h], "kv_starts": starts[1][0, h]}
            ref = sampled_block_mass(q[:, h : h + 1], k[:, h : h + 1], 32, 32, qo, ko, rows, **bounds)
            assert (mass[:, h : h + 1].double() - ref).abs().max() < 1e-6


def test_sampled_queries_cover_every_block_of_every_order():
    from dit_sparse.calibration import sample_query_rows

    layout = TokenLayout((3, 5, 7), text_len=6)           # 111 tokens: a partial last block of 15
    g = torch.Generator().manual_seed(0)
    orders = [layout.tile_order((1, 4, 4)), torch.stack([torch.randperm(layout.seq_len, generator=g) for _ in range(3)])[None]]
    q_blocks = [torch.argsort(order) // 32 for order in orders]
    rows = sample_query_rows(layout.seq_len, 32, q_blocks, rows_per_block=1, seed=0)
    for blocks in q_blocks:
        blocks = blocks.reshape(-1, layout.seq_len)[:, rows]
        assert all(set(row.tolist()) == set(range(4)) for row in blocks)
    assert sample_query_rows(layout.seq_len, 32, q_blocks, rows_per_block=9) is None    # over a quarter of 32
    assert sample_query_rows(layout.seq_len, 32, q_blocks, rows_per_block=None) is None


def test_sampled_mass_plans_like_the_exact_mass_on_local_attention():
    """Attention that decays with distance on the grid: the default sample (16 of 64 queries per
    block) keeps the plan's recall within a point of the plan made from every query."""
    from dit_sparse.planner import calibrate, plan_from_calibration
    from dit_sparse.scoring import recall

    layout = TokenLayout((4, 16, 16))
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in layout.grid), indexing="ij")
    positions = torch.stack([t, h, w], -1).reshape(-1, 3)
    features = torch.cat([torch.cos(positions[:, :, None] * torch.tensor([0.3, 0.7, 1.3])),
                          torch.sin(positions[:, :, None] * torch.tensor([0.3, 0.7, 1.3]))], -1).reshape(-1, 18)
    q = k = (4 * features)[None, :, None, :].expand(1, -1, 2, -1) + 0.1 * torch.randn(1, layout.seq_len, 2, 18)
    exact = calibrate(q, k, layout, SparseAttentionConfig(pattern="adaptive", mass_rows=None)).masses["tile"]
    recalls = {}
    for rows in (None, 16):
        config = SparseAttentionConfig(pattern="adaptive", density=0.2, block_size=64, mass_rows=rows)
        plan, _ = plan_from_calibration(calibrate(q, k, layout, config), config)
        recalls[rows] = recall(exact, plan.to_block_mask(), layout, 64).mean().item()
    assert recalls[16] > recalls[None] - 0.01
