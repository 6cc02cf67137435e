import pytest

from dit_sparse import SparseAttentionConfig


def test_defaults_and_budget():
    c = SparseAttentionConfig()
    assert c.pattern == "auto" and c.density == 0.15 and c.top_p is None
    assert SparseAttentionConfig(top_p=0.9).density is None
    assert c.block_sizes == (64, 64) and c.tile == (1, 8, 8)
    assert SparseAttentionConfig(block_size=128).tile == (2, 8, 8)
    assert SparseAttentionConfig(block_size=(128, 32)).tile == (2, 4, 4)


@pytest.mark.parametrize("dense_steps,total,expected", [(0.25, 50, 12), (0.25, 4, 1), (0.0, 10, 0), (10, 4, 4), (3, 50, 3), (1.0, 7, 7)])
def test_dense_steps(dense_steps, total, expected):
    assert SparseAttentionConfig(dense_steps=dense_steps).num_dense_steps(total) == expected


def test_round_trip_through_dict():
    c = SparseAttentionConfig(
        pattern="radial", alpha=2.0, exponent=0.6, dense_layers=(0, 3), block_size=(128, 64), key_clusters=100, kmeans_iters=4
    )
    assert SparseAttentionConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pattern": "sliding"}, "pattern must be one of"),
        ({"density": 0.2, "top_p": 0.9}, "one budget"),
        ({"density": 0.0}, "density must lie in"),
        ({"density": 1.5}, "density must lie in"),
        ({"top_p": -0.1}, "top_p must lie in"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"alpha": 1.0, "exponent": 1.0}, "exponent"),
        ({"dense_steps": 1.5}, "fractional dense_steps"),
        ({"dense_steps": -1}, "dense_steps must be >= 0"),
        ({"dense_steps": "10"}, "dense_steps must be an int"),
        ({"dense_last_steps": -1}, "dense_last_steps"),
        ({"dense_layers": (0, -1)}, "dense_layers"),
        ({"block_size": 48}, "powers of two"),
        ({"block_size": 8}, "powers of two"),
        ({"tile_shape": (1, 8)}, "tile_shape"),
        ({"min_recall": 1.2}, "min_recall"),
        ({"max_error": -0.1}, "max_error must be a number >= 0"),
        ({"fallback_share": -1}, "fallback_share must be a number >= 0"),
        ({"error_rows": 0}, "error_rows must be an int >= 1"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"per_context_plans": "yes"}, "per_context_plans must be True or False"),
        ({"split_key_clusters": 1}, "split_key_clusters must be True or False"),
        ({"reuse_plans": 1}, "reuse_plans must be True or False"),
        ({"query_clusters": 0}, "query_clusters"),
        ({"key_clusters": 2.5}, "key_clusters"),
        ({"kmeans_iters": 0}, "kmeans_iters must be an int >= 1"),
    ],
)
def test_bad_values_are_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SparseAttentionConfig(**kwargs)


def test_unknown_fields_in_dict():
    with pytest.raises(ValueError, match="unknown SparseAttentionConfig fields: colour"):
        SparseAttentionConfig.from_dict({"colour": 1})


@pytest.mark.parametrize(
    "block_size,grid,tile",
    [
        (64, (21, 30, 52), (1, 8, 8)),
        (128, (21, 30, 52), (2, 8, 8)),
        (128, (1, 64, 64), (1, 8, 16)),   # an image: a flat tile, not half of a 2-frame one
        (64, (1, 64, 64), (1, 8, 8)),
        (64, (5, 4, 4), (4, 4, 4)),       # a small frame: the volume moves to time
        (128, (1, 9, 13), (1, 9, 13)),
        (64, (3, 7, 9), (1, 7, 8)),
    ],
)
def test_tile_for_fits_the_grid(block_size, grid, tile):
    assert SparseAttentionConfig(block_size=block_size).tile_for(grid) == tile
    assert SparseAttentionConfig(block_size=block_size, tile_shape=(1, 2, 3)).tile_for(grid) == (1, 2, 3)
