import itertools

import pytest
import torch

from dit_sparse import TokenLayout


def brute_force_tile_order(layout: TokenLayout, tile) -> list[int]:
    """Tokens listed tile by tile with plain loops (independent of the vectorised version)."""
    T, H, W = layout.grid
    a, b, c = tile
    order = []
    for t0, h0, w0 in itertools.product(range(0, T, a), range(0, H, b), range(0, W, c)):
        for t, h, w in itertools.product(range(t0, min(t0 + a, T)), range(h0, min(h0 + b, H)), range(w0, min(w0 + c, W))):
            order.append(layout.video_offset + t * H * W + h * W + w)
    return order + list(range(layout.text_offset, layout.text_offset + layout.text_len))


@pytest.mark.parametrize("grid,tile", [((4, 8, 8), (1, 4, 4)), ((3, 5, 7), (2, 4, 4)), ((5, 9, 6), (2, 4, 8)), ((1, 3, 3), (1, 8, 8))])
@pytest.mark.parametrize("text_len,text_first", [(0, False), (11, False), (11, True)])
def test_tile_order_matches_loops_and_round_trips(grid, tile, text_len, text_first):
    layout = TokenLayout(grid, text_len=text_len, text_first=text_first)
    order = layout.tile_order(tile)
    assert order.tolist() == brute_force_tile_order(layout, tile)
    inv = TokenLayout.inverse(order)
    assert torch.equal(order[inv], torch.arange(layout.seq_len))
    assert torch.equal(inv[order], torch.arange(layout.seq_len))
    text = order[layout.video_len :]
    assert text.tolist() == list(range(layout.text_offset, layout.text_offset + text_len))


def test_full_tiles_are_compact_cubes():
    layout = TokenLayout((4, 16, 16))
    order = layout.tile_order((2, 4, 8))
    coords = layout.video_coords()[order]
    for block in coords.split(64):
        spans = block.max(0).values - block.min(0).values + 1
        assert spans.tolist() == [2, 4, 8]


def test_lengths_and_blocks():
    layout = TokenLayout((5, 10, 20), text_len=24)
    assert layout.video_len == 1000 and layout.seq_len == 1024
    assert layout.num_blocks(64) == 16 and layout.num_blocks(100) == 11
    assert TokenLayout((5, 10, 20)).num_blocks(64) == 16


def test_key_valid_len_counts_video_and_real_text():
    layout = TokenLayout((2, 4, 4), text_len=10, valid_text_len=(10, 3))
    assert layout.key_valid_len(2).tolist() == [42, 35]
    assert TokenLayout((2, 4, 4), text_len=10).key_valid_len(2) is None
    with pytest.raises(ValueError, match="batch"):
        layout.key_valid_len(3)


def test_geometry_ignores_padding():
    a = TokenLayout((2, 4, 4), 10, valid_text_len=(4,))
    assert a.geometry == TokenLayout((2, 4, 4), 10).geometry
    assert a.with_valid_text_len(None) == TokenLayout((2, 4, 4), 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"grid": (0, 4, 4)}, "grid"),
        ({"grid": (2, 4)}, "grid"),
        ({"grid": (2, 4, 4), "text_len": -1}, "text_len"),
        ({"grid": (2, 4, 4), "text_len": 5, "valid_text_len": (6,)}, "valid_text_len"),
        ({"grid": (2, 4, 4), "text_len": 5, "valid_text_len": ()}, "valid_text_len"),
    ],
)
def test_bad_layouts_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenLayout(**kwargs)


@pytest.mark.parametrize("tile", [(0, 4, 4), (1, 4), (1, -2, 4)])
def test_bad_tiles_are_rejected(tile):
    with pytest.raises(ValueError, match="tile"):
        TokenLayout((2, 4, 4)).tile_order(tile)
