"""The peer presets against small hand-computed cases and brute-force token rules."""

import numpy as np
import pytest
import torch

from dit_sparse import BlockSparsePlan, SparseAttentionConfig, TokenLayout, sparse_attention
from dit_sparse.budget import Budget
from dit_sparse.families import SemanticClustering, band_thresholds
from dit_sparse.output_error import sample_rows
from dit_sparse.families.peers import (
    radial_paper_block_mask,
    svg1_band_width,
    svg1_block_mask,
    svg2_block_mask,
    svg2_cluster_counts,
    svg2_cluster_selection,
)
from dit_sparse.planner import build_plan
from token_rules import pool

TRIDIAGONAL = [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]


def test_radial_paper_hand_computed():
    # 9 frames of 16 x 16 = 256 tokens, blocks of 64: a frame is 4 blocks; 2**bit_length(256) = 512.
    mask = radial_paper_block_mask(TokenLayout((9, 16, 16)), 64, decay=0.2).int()
    frame = lambda i, j: mask[4 * i : 4 * i + 4, 4 * j : 4 * j + 4].tolist()  # noqa: E731
    assert mask[:, :4].all()                                      # key frame 0: the sink
    assert frame(5, 4) == frame(4, 5) == [[1] * 4] * 4             # adjacent frames dense
    # d = 2 or 3: 512 / 4 = 128 >= 128, band max(128 * 0.2, 64) = 64 tokens; the shrink keeps a block
    # when > 60 % of its non-empty columns are over a third full: the diagonal and its neighbours
    assert frame(3, 1) == frame(8, 5) == TRIDIAGONAL
    # d = 4..7: 512 / 8 = 64 < 128, thinned to every int(128 / 64) = 2nd distance: 4 and 6 keep the band
    assert frame(8, 4) == frame(8, 2) == TRIDIAGONAL
    assert frame(8, 3) == frame(8, 1) == [[0] * 4] * 4


def test_radial_paper_pads_lengths_that_are_not_block_multiples():
    layout = TokenLayout((3, 5, 7), text_len=6)                   # 105 video tokens, frames of 35
    mask = radial_paper_block_mask(layout, 32)
    assert mask.shape == (4, 4) and mask[:3, 0].all()             # frame 0 (tokens 0-34) fills block 0
    # block 3 holds 9 video rows of frame 2 and the text: 9 / 32 rows is not over a third, so the
    # shrink drops it (the plan keeps it whole: it is a text block)
    assert not mask[3, 0]
    plan, report = build_plan(*_qk(layout), layout, SparseAttentionConfig.preset("radial_paper", block_size=32))
    assert report.family == [["radial_paper"] * 2]
    assert torch.equal(plan.to_block_mask()[0, 0, :3, :3], mask[:3, :3])


def test_svg1_band_width_and_mask():
    assert svg1_band_width(TokenLayout((21, 30, 52)), 0.25) == 4480        # ceil(4389.3 / 128) * 128
    layout = TokenLayout((4, 8, 8))                                        # 256 tokens, frames of 64
    assert svg1_band_width(layout, 0.25) == 128
    # band |p_q - p_k| <= 128 over blocks of 64 (nearest tokens of blocks 0 and 3 are 129 apart),
    # plus key block 0 (the first frame's tokens)
    assert svg1_block_mask(layout, (64, 64), 0.25).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_svg1_profiles_each_head_into_the_spatial_or_temporal_order():
    from dit_sparse.eval.synthetic import synthetic_attention

    data = synthetic_attention((8, 16, 16), ["local", "temporal", "sink"], head_dim=32, seed=0)
    layout = data.layout
    config = SparseAttentionConfig.preset("svg1", block_size=64)
    plan, report = build_plan(data.q, data.k, layout, config, v=data.v)
    orders = {"raster": layout.identity_order(), "position": layout.position_order()}
    assert torch.equal(plan.q_order[0, 1], orders["position"])             # the temporal head
    # each head takes the order whose profiling band (+-2 frames of tokens) errs less on the rows
    rows = sample_rows(layout, 64, seed=0, within=10_000)
    dense = sparse_attention(data.q, data.k, data.v, _full_plan(layout), backend="torch_reference")[:, rows]
    profile = band_thresholds(layout, (64, 64)) <= 2 * 256
    errors = {}
    for name, order in orders.items():
        masked = BlockSparsePlan.from_block_mask(profile.expand(3, -1, -1), layout, 64, q_order=order, kv_order=order)
        out = sparse_attention(data.q, data.k, data.v, masked, backend="torch_reference")[:, rows]
        errors[name] = ((out - dense).pow(2).sum((1, 3)) / dense.pow(2).sum((1, 3))).sqrt()[0]
    for h in range(3):
        chosen = "position" if torch.equal(plan.q_order[0, h], orders["position"]) else "raster"
        assert torch.equal(plan.q_order[0, h], orders[chosen])
        assert errors[chosen][h] <= errors["raster" if chosen == "position" else "position"][h]
    assert torch.equal(plan.to_block_mask()[0, 0], svg1_block_mask(layout, (64, 64), 0.25))
    with pytest.raises(ValueError, match="svg1' profiles each head's output and needs the values"):
        build_plan(data.q, data.k, data.layout, config)


def _clustering(probs: list[float], key_size: int) -> SemanticClustering:
    """One query cluster and len(probs) equal key clusters whose size-weighted centroid scores
    are ``probs`` (scale 1)."""
    n_k = len(probs)
    k_centroids = torch.eye(n_k)[None, None]
    q_centroids = torch.log(torch.tensor(probs))[None, None, None]
    k_labels = torch.arange(n_k).repeat_interleave(key_size)[None, None]
    q_labels = torch.zeros(1, 1, n_k * key_size, dtype=torch.long)
    return SemanticClustering(q_labels, k_labels, q_centroids, k_centroids)


def test_svg2_selection_hand_computed():
    clustering = _clustering([0.5, 0.25, 0.15, 0.06, 0.04], key_size=20)
    keep = lambda budget: svg2_cluster_selection(clustering, budget, scale=1.0)[0, 0, 0].int().tolist()  # noqa: E731
    assert keep(Budget(top_p=0.85)) == [1, 1, 1, 0, 0]    # 0.5, 0.75, 0.9 > 0.85: stop
    assert keep(Budget(top_p=0.6)) == [1, 1, 0, 0, 0]
    assert keep(Budget(top_p=0.1)) == [1, 0, 0, 0, 0]     # at least floor(0.1 * 5) = 0 -> one cluster
    assert keep(Budget(density=0.3)) == [1, 1, 0, 0, 0]   # 30 of 100 keys: 20, then 40 >= 30
    assert svg2_cluster_counts(TokenLayout((21, 30, 52))) == (200, 1000)


def test_svg2_blocks_keep_every_block_pair_holding_a_kept_cluster_pair():
    layout = TokenLayout((2, 4, 6), text_len=5)
    g = torch.Generator().manual_seed(0)
    n = layout.video_len
    q_labels, k_labels = torch.randint(0, 4, (1, 1, n), generator=g), torch.randint(0, 6, (1, 1, n), generator=g)
    clustering = SemanticClustering(q_labels, k_labels, torch.randn(1, 1, 4, 8, generator=g), torch.randn(1, 1, 6, 8, generator=g))
    mask = svg2_block_mask(clustering, layout, (8, 8), Budget(top_p=0.7))
    selection = svg2_cluster_selection(clustering, Budget(top_p=0.7))[0, 0].numpy()
    q_sorted, k_sorted = q_labels[0, 0].sort().values.numpy(), k_labels[0, 0].sort().values.numpy()
    tokens = np.zeros((layout.seq_len, layout.seq_len), dtype=bool)
    tokens[:n, :n] = selection[q_sorted[:, None], k_sorted[None, :]]
    is_text = np.arange(layout.seq_len) >= n
    assert np.array_equal(mask[0, 0].numpy(), pool(tokens, is_text, (8, 8)))


def test_presets_carry_the_peers_defaults():
    radial = SparseAttentionConfig.preset("radial_paper")
    assert (radial.block_size, radial.radial_decay, radial.num_dense_steps(50), radial.dense_layers) == (128, 0.2, 12, (0,))
    svg2 = SparseAttentionConfig.preset("svg2")
    assert (svg2.top_p, svg2.kmeans_iters, svg2.num_dense_steps(50)) == (0.9, 50, 10)
    assert SparseAttentionConfig.preset("svg2", density=0.15).top_p is None
    with pytest.raises(ValueError, match="unknown preset 'svg3'"):
        SparseAttentionConfig.preset("svg3")
    with pytest.raises(ValueError, match="svg1' takes its sparsity as density"):
        SparseAttentionConfig(pattern="svg1", top_p=0.9)


def _full_plan(layout):
    n = layout.num_blocks(64)
    return BlockSparsePlan.from_block_mask(torch.ones(3, n, n, dtype=torch.bool), layout, 64)


def _qk(layout, heads=2, dim=8):
    return torch.randn(1, layout.seq_len, heads, dim), torch.randn(1, layout.seq_len, heads, dim)
