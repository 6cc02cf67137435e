import pytest
import torch

from dit_sparse import SparseAttentionConfig, TokenLayout, sparse_attention
from dit_sparse.config import PATTERNS
from dit_sparse.planner import FAMILIES, PEERS, build_plan, calibrate, plan_from_calibration
from dit_sparse.budget import Budget
from dit_sparse.scoring import target_density, video_density

LAYOUTS = [
    (TokenLayout((3, 17, 13), text_len=11), 64),
    (TokenLayout((5, 9, 20), text_len=20, text_first=True), 128),
    (TokenLayout((1, 24, 30)), 128),
    (TokenLayout((2, 15, 11), text_len=5), (128, 64)),
    (TokenLayout((2, 3, 5), text_len=40, text_first=True), 64),  # the video fits in the text block
]


def spent(plan) -> torch.Tensor:
    """``[B, H]`` video density of each head as its budget counts it: in blocks for a head on fixed
    blocks, in tokens for one on variable blocks (in a plan with variable blocks, a head on fixed
    blocks has the fixed boundaries followed by empty blocks)."""
    layout, blocks, mask = plan.layout, (plan.block_size_q, plan.block_size_k), plan.to_block_mask()
    fixed = [layout.num_blocks(size) for size in blocks]
    in_blocks = video_density(mask[..., : fixed[0], : fixed[1]], layout, blocks)
    if not plan.variable_blocks:
        return in_blocks
    starts = (plan.block_starts("q"), plan.block_starts("kv"))
    on_fixed = torch.ones_like(in_blocks, dtype=torch.bool)
    for bounds, size, n in zip(starts, blocks, fixed):
        own = torch.clamp(torch.arange(n + 1) * size, max=layout.seq_len)
        on_fixed &= (bounds[..., : n + 1] == own).all(-1) & (bounds[..., n + 1 :] == layout.seq_len).all(-1)
    return torch.where(on_fixed, in_blocks, video_density(mask, layout, blocks, starts))


def qk(layout: TokenLayout, batch: int = 1, heads: int = 3, dim: int = 16):
    return torch.randn(batch, layout.seq_len, heads, dim), torch.randn(batch, layout.seq_len, heads, dim)


@pytest.mark.parametrize("layout,block_size", LAYOUTS, ids=[str(lay.grid) for lay, _ in LAYOUTS])
@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p not in PEERS])   # peers: tests/test_peers.py
def test_every_pattern_plans_within_its_density(layout, block_size, pattern):
    q, k = qk(layout)
    config = SparseAttentionConfig(pattern=pattern, density=0.3, block_size=block_size, min_recall=0.0)
    plan, report = build_plan(q, k, layout, config)
    assert plan.num_heads == 3 and plan.batch_size == 1
    assert len(report.family) == 1 and len(report.family[0]) == 3
    assert set(report.family[0]) <= set(FAMILIES) | {"dense"}
    assert torch.allclose(report.density, plan.density(per_head=True))
    assert ((report.recall > 0) & (report.recall <= 1 + 1e-6)).all()
    if pattern != "dense":  # the budget's block count rounds 0.3 of the video key blocks
        allowed = target_density(Budget(density=0.3), layout, config.block_sizes[1])
        if pattern in ("radial", "spatiotemporal"):  # or the family's smallest window, pooled to blocks
            floor, _ = build_plan(q, k, layout, SparseAttentionConfig(pattern=pattern, density=1e-3, block_size=block_size))
            allowed = torch.clamp(spent(floor), min=allowed)
        assert (spent(plan) <= allowed + 1e-6).all()
    assert report.seconds > 0


def test_auto_keeps_each_heads_best_family_and_its_recall():
    layout = TokenLayout((4, 12, 16), text_len=6)
    q, k = qk(layout, batch=2, heads=4)
    config = SparseAttentionConfig(pattern="auto", density=0.25, min_recall=0.0)
    calibration = calibrate(q, k, layout, config)
    recalls = torch.stack([
        plan_from_calibration(calibration, SparseAttentionConfig(pattern=name, density=0.25))[1].recall
        for name in FAMILIES
    ])
    plan, report = plan_from_calibration(calibration, config)
    assert torch.allclose(report.recall, recalls.max(0).values)
    best = recalls.argmax(0)
    assert report.family == [[FAMILIES[i] for i in row] for row in best.tolist()]


def test_auto_recall_is_the_token_level_mass_of_its_plan():
    """Mixed per-head orders (semantic heads have their own) must agree with the reported recall."""
    layout = TokenLayout((3, 8, 12), text_len=7, text_first=True)
    q, k = qk(layout, heads=4, dim=8)
    q[..., :2, :] *= 4.0   # sharper heads
    plan, report = build_plan(q, k, layout, SparseAttentionConfig(pattern="auto", density=0.3, min_recall=0.0, block_size=32))
    assert "semantic" in report.family[0] and len(set(report.family[0])) > 1
    probs = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / 8**0.5).softmax(-1)
    expected = (probs * plan.to_token_mask()).sum(-1).mean(-1)
    assert torch.allclose(report.recall, expected, atol=1e-5)


def test_auto_leaves_heads_below_min_recall_dense():
    layout = TokenLayout((2, 8, 16))
    q, k = qk(layout, heads=2)
    plan, report = build_plan(q, k, layout, SparseAttentionConfig(pattern="auto", density=0.2, min_recall=0.999))
    assert report.family == [["dense", "dense"]]
    assert plan.density() == 1.0 and (report.recall == 1).all()


def test_top_p_reaches_p_and_auto_takes_the_sparsest_family_that_does():
    layout = TokenLayout((4, 16, 16), text_len=10)
    q, k = qk(layout, heads=3, dim=16)
    q *= 3.0
    calibration = calibrate(q, k, layout, SparseAttentionConfig(pattern="auto", top_p=0.8))
    reports = {name: plan_from_calibration(calibration, SparseAttentionConfig(pattern=name, top_p=0.8))[1] for name in FAMILIES}
    for name in ("radial", "spatiotemporal", "adaptive"):
        assert (reports[name].recall >= 0.8 - 1e-5).all(), name
    plan, report = plan_from_calibration(calibration, SparseAttentionConfig(pattern="auto", top_p=0.8, min_recall=0.0))
    for h, name in enumerate(report.family[0]):
        reaching = [f for f in FAMILIES if reports[f].recall[0, h] >= 0.8 - 1e-6]
        sparsest = min(reaching, key=lambda f: float(reports[f].density[0, h]))
        assert float(report.density[0, h]) == pytest.approx(float(reports[sparsest].density[0, h]), abs=0.02)


def test_alpha_budget_spends_fewer_blocks_as_the_video_grows():
    densities = []
    for frames in (2, 8):
        layout = TokenLayout((frames, 16, 16))
        q, k = qk(layout, heads=1)
        plan, _ = build_plan(q, k, layout, SparseAttentionConfig(pattern="adaptive", alpha=16.0, exponent=0.5))
        densities.append(plan.density())
    assert densities[1] < densities[0]


def test_shared_batch_plan_has_one_order_per_head():
    layout = TokenLayout((2, 8, 8), text_len=4)
    q, k = qk(layout, batch=2, heads=2)
    plan, report = build_plan(q, k, layout, SparseAttentionConfig(pattern="semantic"), share_batch=True)
    assert plan.batch_size == 1 and plan.q_order.shape == (1, 2, layout.seq_len)
    assert report.recall.shape == (1, 2)


def test_bad_inputs_name_the_problem():
    layout = TokenLayout((2, 8, 8))
    q, k = qk(layout)
    with pytest.raises(ValueError, match="pass the layout of this attention call"):
        build_plan(q[:, :-1], k[:, :-1], layout, SparseAttentionConfig())
    calibration = calibrate(q, k, layout, SparseAttentionConfig(pattern="adaptive"))
    with pytest.raises(ValueError, match="no block mass over the clusters, fine_clusters order; calibrate with pattern=.semantic."):
        plan_from_calibration(calibration, SparseAttentionConfig(pattern="semantic"))
    with pytest.raises(ValueError, match="measured with blocks"):
        plan_from_calibration(calibration, SparseAttentionConfig(pattern="adaptive", block_size=128))
    # auto by error measures no block mass over the cluster orders: the recall rule cannot plan from it
    by_error = calibrate(q, k, layout, SparseAttentionConfig(), v=k)
    plan_from_calibration(by_error, SparseAttentionConfig(density=0.3))
    with pytest.raises(ValueError, match="no block mass over the clusters, fine_clusters order.*min_recall=0.0"):
        plan_from_calibration(by_error, SparseAttentionConfig(pattern="semantic"))


def _sampled_error(data, plan, rows):
    """Exact relative output error per head on the given query rows: dense SDPA under the plan's
    token mask against dense SDPA."""
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (data.q, data.k, data.v)))
    sparse = sparse_attention(data.q, data.k, data.v, plan, backend="torch_reference").transpose(1, 2)
    diff, ref = (sparse - dense)[:, :, rows], dense[:, :, rows]
    return (diff.pow(2).sum((2, 3)) / ref.pow(2).sum((2, 3))).sqrt()


@pytest.fixture(scope="module")
def synthetic():
    from dit_sparse.eval.synthetic import HEAD_TYPES, synthetic_attention

    data = synthetic_attention((4, 16, 16), HEAD_TYPES, head_dim=16, text_len=20, seed=1)
    # the recall rule's calibration measures every family's block mass: it serves each pattern below
    return data, calibrate(data.q, data.k, data.layout, SparseAttentionConfig(min_recall=0.0), v=data.v)


def test_auto_picks_each_heads_family_with_the_lowest_output_error(synthetic):
    data, calibration = synthetic
    no_fallback = SparseAttentionConfig(density=0.15, max_error=float("inf"))
    plan, report = plan_from_calibration(calibration, no_fallback)
    rows = calibration.rows.rows
    assert torch.allclose(report.error, _sampled_error(data, plan, rows), atol=1e-4)
    # the recall it reports: the softmax mass its token mask keeps on the same rows
    scores = torch.einsum("brhd,bshd->bhrs", data.q[:, rows], data.k) * data.q.shape[-1] ** -0.5
    kept = (scores.softmax(-1) * plan.to_token_mask(1)[:, :, rows]).sum(-1).mean(-1)
    assert torch.allclose(report.recall, kept, atol=1e-5)
    target = target_density(Budget(density=0.15), data.layout, 64)
    per_family = {}
    for name in FAMILIES:
        family_plan, family_report = plan_from_calibration(calibration, SparseAttentionConfig(pattern=name, density=0.15))
        fits = spent(family_plan) <= target + 1e-6
        per_family[name] = torch.where(fits, _sampled_error(data, family_plan, rows), float("inf"))
    best = torch.stack([per_family[name] for name in FAMILIES]).min(0).values
    assert torch.allclose(report.error, best, atol=1e-4)
    assert all(per_family[name][0, h] <= best[0, h] + 1e-4 for h, name in enumerate(report.family[0]))


def test_split_key_clusters_off_keeps_the_clusters_as_made(synthetic):
    data = synthetic[0]
    config = SparseAttentionConfig(density=0.25, max_error=float("inf"), split_key_clusters=False)
    calibration = calibrate(data.q, data.k, data.layout, config, v=data.v)
    assert "fine_clusters" not in calibration.orders and calibration.fine_clustering is None
    plan, report = plan_from_calibration(calibration, config)
    clusters = calibration.starts["clusters"][1]
    semantic = [h for h, name in enumerate(report.family[0]) if name == "semantic"]
    assert semantic and all(torch.equal(plan.block_starts("kv")[0, h, : clusters.shape[-1]], clusters[0, h]) for h in semantic)
    with pytest.raises(ValueError, match="no fine_clusters order; calibrate with the config you plan with"):
        plan_from_calibration(calibration, SparseAttentionConfig(density=0.25))


def test_auto_fallback_raises_the_worst_heads_within_its_share(synthetic):
    data, calibration = synthetic
    base = plan_from_calibration(calibration, SparseAttentionConfig(density=0.15, max_error=float("inf")))[1]
    plan, report = plan_from_calibration(calibration, SparseAttentionConfig(density=0.15, max_error=0.0, fallback_share=0.5))
    density = spent(plan)
    assert float(density.mean()) <= 1.5 * 0.15 + 1e-6           # the share counts from the requested density
    raised = density > spent(plan_from_calibration(calibration, SparseAttentionConfig(density=0.15, max_error=float("inf")))[0]) + 1e-6
    assert raised.any() and (report.error[raised] < base.error[raised]).all()
    worst = int(base.error.argmax())
    assert bool(raised[0, worst])
    # a generous share and no tolerated error: the worst head goes dense
    plan, report = plan_from_calibration(calibration, SparseAttentionConfig(density=0.15, max_error=0.0, fallback_share=10.0))
    assert report.family[0][worst] == "dense" and float(report.error[0, worst]) == 0.0


def test_auto_by_error_needs_the_values():
    layout = TokenLayout((2, 8, 8))
    q, k = qk(layout)
    with pytest.raises(ValueError, match="pass v=..., or set min_recall"):
        build_plan(q, k, layout, SparseAttentionConfig())


def test_auto_defaults_keep_almost_every_head_sparse_even_when_every_head_errs():
    """Heads of pure noise: every family errs far above max_error, yet the fallback's allowance
    (a tenth of the budget) leaves at most a handful of heads dense and the budget spent."""
    layout = TokenLayout((4, 16, 16))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, 24, 16, generator=g) for _ in range(3))
    plan, report = build_plan(q, k, layout, SparseAttentionConfig(), v=v)
    dense = sum(name == "dense" for name in report.family[0])
    sparse = torch.tensor([name != "dense" for name in report.family[0]])
    assert dense <= 0.25 * 24 and (report.error[0, sparse] > 0.05).all()
    assert float(spent(plan).mean()) <= 1.1 * 0.15 + 1e-6


def test_auto_may_plan_semantic_heads_on_cluster_aligned_blocks(synthetic):
    """The semantic family's cluster-aligned variants (key clusters as made, and each split in two)
    compete by estimated error like any other: a head that takes one keeps its clusters' block
    boundaries in the plan (then empty blocks up to the plan's block count), its estimated error is
    its exact error, and the plan stays exact."""
    data, calibration = synthetic
    plan, report = plan_from_calibration(calibration, SparseAttentionConfig(density=0.25, max_error=float("inf")))
    seq = data.layout.seq_len

    def on(order: str, h: int) -> bool:
        return all(
            bool(torch.equal(got[: len(own)], own)) and bool((got[len(own):] == seq).all())
            for got, own in ((plan.block_starts(w)[0, h], s[0, h]) for w, s in zip(("q", "kv"), calibration.starts[order]))
        )

    chosen = {order: [on(order, h) for h in range(plan.num_heads)] for order in ("clusters", "fine_clusters")}
    assert plan.variable_blocks and any(any(heads) for heads in chosen.values())
    assert all(report.family[0][h] == "semantic" for heads in chosen.values() for h, taken in enumerate(heads) if taken)
    assert torch.allclose(report.error, _sampled_error(data, plan, calibration.rows.rows), atol=1e-4)
    torch.testing.assert_close(
        sparse_attention(data.q, data.k, data.v, plan, backend="torch"),
        sparse_attention(data.q, data.k, data.v, plan, backend="torch_reference"), atol=1e-5, rtol=1e-5,
    )
