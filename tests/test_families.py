import math

import numpy as np
import pytest
import torch

from dit_sparse import SparseAttentionConfig, TokenLayout
from dit_sparse.budget import Budget
from dit_sparse.families import (
    adaptive_block_mask,
    band_thresholds,
    fit_radial_band,
    radial_band_thresholds,
    radial_block_mask,
    radial_thresholds,
    spatiotemporal_block_mask,
    spatiotemporal_thresholds,
)
from dit_sparse.families.radial import NEIGHBOUR_WIDENING
from dit_sparse.families.spatiotemporal import sink_key_blocks
from dit_sparse.families.window import _Ranking, solve_window
from dit_sparse.scoring import recall, video_density
from token_rules import band_rule, radial_band_rule, radial_rule, spatiotemporal_rule

# (layout, tile, block sizes): odd grids, partial tiles, text first and last, unequal blocks.
SMALL_CASES = [
    (TokenLayout((5, 6, 7)), (1, 3, 4), (16, 16)),
    (TokenLayout((4, 5, 6), text_len=7, text_first=True), (2, 3, 3), (16, 8)),
    (TokenLayout((6, 4, 5), text_len=9), (1, 4, 5), (8, 32)),
    (TokenLayout((1, 11, 13), text_len=5), (1, 4, 8), (32, 32)),
]
# Block sizes 64 and 128 with the tiles the planner picks for them.
LARGE_CASES = [
    (TokenLayout((3, 17, 13), text_len=11), 64),
    (TokenLayout((5, 9, 20), text_len=20, text_first=True), 128),
    (TokenLayout((1, 24, 30)), 128),
]


def _cases():
    for layout, tile, blocks in SMALL_CASES:
        yield layout, tile, blocks
    for layout, block in LARGE_CASES:
        yield layout, SparseAttentionConfig(block_size=block).tile_for(layout.grid), (block, block)


CASES = list(_cases())
IDS = [f"{lay.grid}-text{lay.text_len}{'first' if lay.text_first else ''}-{b}" for lay, _, b in CASES]


@pytest.mark.parametrize("layout,tile,blocks", CASES, ids=IDS)
@pytest.mark.parametrize("sink", [True, False])
def test_radial_matches_token_rule(layout, tile, blocks, sink):
    thresholds = radial_thresholds(layout, tile, blocks, sink)
    for radius in (0.5, 3.3, 5.7, 9.1, 17.3, 40.2):
        expected = radial_rule(layout, tile, blocks, radius, sink)
        assert np.array_equal((thresholds <= radius).numpy(), expected), radius


@pytest.mark.parametrize("layout,tile,blocks", CASES, ids=IDS)
@pytest.mark.parametrize("frame_cost", [0.0, 1.0, 16.0, math.inf])
def test_spatiotemporal_matches_token_rule(layout, tile, blocks, frame_cost):
    thresholds = spatiotemporal_thresholds(layout, tile, blocks, frame_cost)
    for radius in (0.5, 3.3, 9.1, 17.3, 40.2):
        expected = spatiotemporal_rule(layout, tile, blocks, radius, frame_cost)
        assert np.array_equal((thresholds <= radius).numpy(), expected), radius


@pytest.mark.parametrize("layout,tile,blocks", CASES, ids=IDS)
@pytest.mark.parametrize("sink", [True, False])
@pytest.mark.parametrize("neighbours", [False, True])
def test_radial_band_matches_token_rule(layout, tile, blocks, sink, neighbours):
    thresholds = radial_band_thresholds(layout, blocks, sink, neighbours)
    widening = NEIGHBOUR_WIDENING if neighbours else 1.0
    for width in (0.5, 1.7, 5.0, 9.0, 17.0, 40.0, 90.0, 400.0):
        expected = radial_band_rule(layout, blocks, width, sink, widening)
        assert np.array_equal((thresholds <= width).numpy(), expected), width


@pytest.mark.parametrize("layout,tile,blocks", CASES, ids=IDS)
@pytest.mark.parametrize("order", ["raster", "position"])
def test_band_matches_token_rule(layout, tile, blocks, order):
    thresholds = band_thresholds(layout, blocks)
    tokens = layout.identity_order() if order == "raster" else layout.position_order()
    for width in (0.5, 7.0, 20.0, 70.0):
        assert np.array_equal((thresholds <= width).numpy(), band_rule(layout, tokens, blocks, width)), width


def test_radial_band_is_dense_near_the_diagonal_and_thins_far_frames():
    layout, blocks = TokenLayout((9, 16, 16)), (64, 64)          # a frame is 4 blocks
    per_frame = (radial_band_thresholds(layout, blocks, sink=False) <= 256.0)[0].view(9, 4).sum(-1)
    # half-width 256 (a frame): frames 0-1 dense, 2-3 +-128, 4-7 +-64 (one block: the query block and
    # the next, one token away), 8 +-32: narrower than a block, kept one block wide as 8 is even
    assert per_frame.tolist() == [4, 4, 3, 3, 2, 2, 2, 2, 2]
    thinned = (radial_band_thresholds(layout, blocks, sink=False) <= 64.0)[0].view(9, 4).sum(-1)
    # +-32 at 2-3, +-16 at 4-7, +-8 at 8: a block wide on frame distances that 2, 4 and 8 divide
    assert thinned.tolist() == [2, 2, 2, 0, 2, 0, 0, 0, 2]


@pytest.mark.parametrize("density,plain_recall,widened_recall", [(0.3, 0.67, 0.96), (0.4, 0.67, 1.0)])
def test_widened_radial_band_keeps_a_frame_head_whole(density, plain_recall, widened_recall):
    layout, blocks = TokenLayout((8, 16, 16)), (64, 64)          # a frame is 4 blocks
    frame = torch.arange(layout.num_blocks(64)) // 4
    own_frame = (frame[:, None] == frame[None, :]).float()
    mass = (own_frame / own_frame.sum(-1, keepdim=True))[None, None]     # every query on its own frame
    plain, widened = (fit_radial_band(mass, layout, blocks, Budget(density=density), neighbours=wide)
                      for wide in (False, True))
    # the plain band must halve per frame distance, so at this budget it cannot cover a whole frame
    assert plain.recall.item() == pytest.approx(plain_recall, abs=0.01)
    assert widened.recall.item() >= widened_recall - 0.01
    assert video_density(widened.mask, layout, blocks).item() <= density + 1 / 32      # rounded up to whole key blocks


def test_position_order_puts_the_frames_of_a_position_together():
    layout = TokenLayout((3, 2, 2), text_len=2, text_first=True)
    assert layout.position_order().tolist() == [2, 6, 10, 3, 7, 11, 4, 8, 12, 5, 9, 13, 0, 1]   # text last


def test_radial_window_shrinks_with_frame_distance():
    layout, tile = TokenLayout((9, 32, 32)), (1, 8, 8)
    mask = radial_thresholds(layout, tile, (64, 64), sink=False) <= 20.0
    per_frame = mask[:16].view(16, 9, 16).sum(-1)[5]  # query tile (0, 1, 1): kept tiles per key frame
    # Radius 20 tokens = 2.5 tiles: offsets with dy^2 + dx^2 <= 6.25 (the 4x4 tile grid but its far
    # corner); the radius shrinks by sqrt 2 per doubling of the frame distance: 14.1, 10, 7.1.
    assert per_frame.tolist() == [15, 15, 9, 9, 5, 5, 5, 5, 1]
    assert (radial_thresholds(layout, tile, (64, 64), sink=True) <= 0)[:, :16].all()


def test_solve_window_count_budget_spends_it_on_the_smallest_thresholds():
    layout, blocks = TokenLayout((8, 16, 24), text_len=10), (64, 64)
    n_q = n_k = layout.num_video_blocks(64)
    with_sink = radial_thresholds(layout, (1, 8, 8), blocks, sink=True).masked_fill(
        torch.zeros(n_q + 1, n_k + 1, dtype=torch.bool).index_fill_(1, torch.arange(6), True), float("-inf"))
    floor = solve_window(with_sink, Budget(density=0.1), layout, blocks)  # the 6 always-kept columns are 1/8
    assert floor[:, :6].all() and video_density(floor, layout, blocks) == pytest.approx(6 / n_k)
    thresholds = radial_thresholds(layout, (1, 8, 8), blocks, sink=False)
    mass = torch.softmax(torch.randn(1, 2, n_q + 1, n_k + 1), -1)
    for density in (0.1, 0.2, 0.45):
        for given in (None, mass):
            mask = solve_window(thresholds, Budget(density=density), layout, blocks, given)
            assert torch.allclose(video_density(mask, layout, blocks).float(), torch.tensor(round(density * n_k) / n_k))
            video = mask[..., :n_q, :n_k].expand(1, 2, n_q, n_k)
            assert video.any(-1).all()                               # every query block keeps a key block
            t = thresholds[:n_q, :n_k]
            for h in range(2):
                kept, dropped = t[video[0, h]], t[~video[0, h]]
                # beyond each row's best block, nothing kept lies above a dropped block
                row_best = t.min(-1, keepdim=True).values
                extra = video[0, h] & (t > row_best)
                assert not extra.any() or t[extra].max() <= dropped.min()
                if given is not None:                               # at the last window, the heaviest
                    last = t[extra].max() if extra.any() else kept.max()
                    tied_kept = video[0, h] & (t == last) & (t > row_best)
                    tied_dropped = ~video[0, h] & (t == last)
                    if tied_kept.any() and tied_dropped.any():
                        assert mass[0, h, :n_q, :n_k][tied_kept].min() >= mass[0, h, :n_q, :n_k][tied_dropped].max()


def _smallest_thresholds_by_rule(thresholds, keep, mass):
    """The count rule of ``solve_window``, entry by entry in Python: per head, rank every block pair by
    (tier, threshold, tie, position), tier 0 for ``-inf``, 1 for its row's first pair in that order,
    2 for the rest; keep tier 0 and the first ``keep`` pairs whose threshold is finite."""
    n_q, n_k = thresholds.shape
    heads = mass.shape[:2] if mass is not None else (1, 1)
    out = torch.zeros(*heads, n_q, n_k, dtype=torch.bool)
    for b, h in np.ndindex(*heads):
        def key(i, j):
            tie = -float(mass[b, h, i, j]) if mass is not None else abs(i * (n_k / n_q) - j)
            return float(thresholds[i, j]), tie, i * n_k + j
        row_best = {(i, min(range(n_k), key=lambda j: key(i, j))) for i in range(n_q)}
        tier = {(i, j): 0 if thresholds[i, j] == -math.inf else 1 if (i, j) in row_best else 2
                for i in range(n_q) for j in range(n_k)}
        ranked = sorted(tier, key=lambda p: (tier[p], *key(*p)))
        for rank, (i, j) in enumerate(ranked):
            out[b, h, i, j] = tier[(i, j)] == 0 or (rank < keep and thresholds[i, j] < math.inf)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_count_budget_ranking_matches_the_rule_entry_by_entry(seed):
    generator = torch.Generator().manual_seed(seed)
    n_q, n_k = [(4, 8), (5, 5), (3, 6)][seed % 3]
    thresholds = torch.randint(0, 4, (n_q, n_k), generator=generator).double()   # many ties
    thresholds[torch.rand(n_q, n_k, generator=generator) < 0.15] = -math.inf
    thresholds[torch.rand(n_q, n_k, generator=generator) < 0.15] = math.inf
    if seed == 5:
        thresholds[1] = math.inf                                                  # a row that keeps nothing
    mass = None if seed % 2 else torch.randint(0, 3, (1, 2, n_q, n_k), generator=generator).float() / 3
    heads = mass.shape[:2] if mass is not None else (1, 1)
    ranking = _Ranking.of(thresholds, mass)           # one ranking serves every count and stripe
    stripe = torch.rand(n_k, generator=generator) < 0.3
    plain, striped = ranking.ranked(), ranking.ranked(stripe)
    for keep in (0, n_q, n_q * n_k // 3, n_q * n_k):
        assert torch.equal(plain.smallest(keep).expand(*heads, n_q, n_k),
                           _smallest_thresholds_by_rule(thresholds, keep, mass)), keep
        assert torch.equal(striped.smallest(keep).expand(*heads, n_q, n_k),
                           _smallest_thresholds_by_rule(thresholds.masked_fill(stripe, -math.inf), keep, mass)), keep


def test_solve_window_top_p_is_the_smallest_window_reaching_p():
    layout, blocks = TokenLayout((6, 16, 16), text_len=5), (64, 64)
    n = layout.num_blocks(64)
    mass = torch.softmax(torch.randn(2, 3, n, n) * 2, -1)
    thresholds = spatiotemporal_thresholds(layout, (1, 8, 8), blocks, frame_cost=4.0)
    mask = solve_window(thresholds, Budget(top_p=0.7), layout, blocks, mass)
    kept = recall(mass, mask, layout, 64)
    assert (kept >= 0.7 - 1e-6).all()
    values = thresholds[thresholds.isfinite()].unique()
    for b, h in np.ndindex(2, 3):
        window = thresholds[mask[b, h] & thresholds.isfinite()].max()
        smaller = values[values < window]
        if len(smaller):
            assert recall(mass[b : b + 1, h : h + 1], thresholds <= smaller.max(), layout, 64) < 0.7
    with pytest.raises(ValueError, match="needs the measured block mass"):
        solve_window(thresholds, Budget(top_p=0.7), layout, blocks)


def test_static_masks_hit_density_and_keep_text():
    layout, blocks = TokenLayout((8, 16, 16), text_len=20), (64, 64)
    budget = Budget(density=0.25)
    for mask in (
        radial_block_mask(layout, (1, 8, 8), blocks, budget),
        spatiotemporal_block_mask(layout, (1, 8, 8), blocks, budget, frame_cost=4.0),
    ):
        assert 0.1 < video_density(mask, layout, blocks) <= 0.25
        assert mask[:, layout.num_video_blocks(64) :].all() and mask[layout.num_video_blocks(64) :].all()


def test_vertical_stripe_keeps_the_heaviest_columns():
    layout, blocks = TokenLayout((4, 16, 16)), (64, 64)
    mass = torch.full((1, 2, 16, 16), 1 / 16)
    mass[0, 0, :, 5] += 1.0
    mass[0, 1, :, 11] += 1.0
    sinks = sink_key_blocks(mass, layout, blocks, count=1)
    assert sinks[0, 0].nonzero().flatten().tolist() == [5] and sinks[0, 1].nonzero().flatten().tolist() == [11]
    mask = spatiotemporal_block_mask(layout, (1, 8, 8), blocks, Budget(density=0.25), math.inf, sink_blocks=sinks)
    assert mask[0, 0, :, 5].all() and mask[0, 1, :, 11].all()
    assert (video_density(mask, layout, blocks) <= 0.25).all()


def test_adaptive_matches_row_top_k_by_loops():
    layout, blocks = TokenLayout((3, 8, 8), text_len=9), (32, 32)
    n = layout.num_blocks(32)
    mass = torch.softmax(torch.randn(2, n, n), -1)
    mask = adaptive_block_mask(mass, layout, blocks, Budget(density=0.4))
    n_video = layout.num_video_blocks(32)
    keep = round(0.4 * n_video)
    for h in range(2):
        for i in range(n):
            if i >= n_video:
                expected = set(range(n))
            else:
                ranked = sorted(range(n_video), key=lambda j: -float(mass[h, i, j]))
                expected = set(ranked[:keep]) | set(range(n_video, n))
            assert set(mask[h, i].nonzero().flatten().tolist()) == expected
