"""Token-level statements of the static families' rules, written straight from their definitions
(numpy over every token pair), and the pooling of a token rule to blocks. Small sequences only."""

from __future__ import annotations

import math

import numpy as np

from dit_sparse import TokenLayout


def pairs(layout: TokenLayout, tile=None, order=None):
    """Per token pair of the tile order (or of ``order``): (query, key) coordinates as [S, 1] and
    [1, S] arrays, and a text flag per token."""
    order = (layout.tile_order(tile) if order is None else order).numpy()
    t, h, w = layout.grid
    video = order - layout.video_offset
    is_text = (video < 0) | (video >= layout.video_len)
    v = np.where(is_text, 0, video)
    coords = np.stack([v // (h * w), (v // w) % h, v % w], axis=1)
    q = {name: coords[:, i][:, None] for i, name in enumerate("thw")}
    k = {name: coords[:, i][None, :] for i, name in enumerate("thw")}
    return q, k, is_text


def pool(keep: np.ndarray, is_text: np.ndarray, block_size) -> np.ndarray:
    """Block mask: a block pair is kept when any of its token pairs is; text rows and columns on."""
    bq, bk = block_size
    keep = keep | is_text[:, None] | is_text[None, :]
    s = keep.shape[0]
    nq, nk = -(-s // bq), -(-s // bk)
    out = np.zeros((nq, nk), dtype=bool)
    for i in range(nq):
        for j in range(nk):
            out[i, j] = keep[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].any()
    # A block holding any text token is a text block (the plan format's rule).
    text_q = [i for i in range(nq) if is_text[i * bq : (i + 1) * bq].any()]
    text_k = [j for j in range(nk) if is_text[j * bk : (j + 1) * bk].any()]
    out[text_q, :] = True
    out[:, text_k] = True
    return out


def tile_gaps(q, k, tile):
    """Per token pair: frames apart, tokens between the tiles' grid positions, same tile position."""
    _, th, tw = tile
    frames = np.abs(q["t"] - k["t"])
    dy = (q["h"] // th - k["h"] // th) * th
    dx = (q["w"] // tw - k["w"] // tw) * tw
    return frames, np.sqrt(dy**2 + dx**2)


def radial_rule(layout: TokenLayout, tile, block_size, radius: float, sink: bool) -> np.ndarray:
    """Radial Attention at window radius ``radius`` (tokens) for frame distance <= 1."""
    q, k, is_text = pairs(layout, tile)
    frames, dist = tile_gaps(q, k, tile)
    tile_area = tile[1] * tile[2]
    shrink = np.where(frames > 1, 2.0 ** np.floor(np.log2(np.maximum(frames, 1))), 1.0)
    r = radius / np.sqrt(shrink)
    window_area = math.pi * r * r
    split = tile_area / window_area
    stride = 2 ** np.ceil(np.log2(np.maximum(split, 1)))
    keep = np.where(
        dist > 0,
        (dist <= r) & (window_area >= tile_area),
        (frames == 0) | (split <= 1) | (frames % stride == 0),
    )
    if sink:
        keep |= k["t"] == 0
    return pool(keep, is_text, block_size)


def spatiotemporal_rule(layout: TokenLayout, tile, block_size, radius: float, frame_cost: float) -> np.ndarray:
    q, k, is_text = pairs(layout, tile)
    frames, dist = tile_gaps(q, k, tile)
    if math.isinf(frame_cost):
        keep = (frames == 0) & (dist <= radius)
    else:
        keep = np.sqrt((frame_cost * frames) ** 2 + dist**2) <= radius
    return pool(keep, is_text, block_size)


def radial_band_rule(layout: TokenLayout, block_size, width: float, sink: bool, neighbours: float = 1.0) -> np.ndarray:
    """Radial Attention's raster band at half-width ``width`` for frame distance <= 1, over the
    raster order: per frame pair a band of within-frame positions halving per doubling of the frame
    distance, never narrower than a key block but then kept on every 2**j-th frame pair only; the
    band of frame distances <= 1 is ``neighbours`` times wider."""
    q, k, is_text = pairs(layout, order=layout.identity_order())
    _, h, w = layout.grid
    frames = np.abs(q["t"] - k["t"])
    gap = np.abs((q["h"] * w + q["w"]) - (k["h"] * w + k["w"]))
    bits = np.floor(np.log2(np.maximum(frames, 1))) + 1
    band = width * 2.0 / 2.0**bits * np.where(frames <= 1, neighbours, 1.0)
    narrowest = block_size[1]
    largest_power_of_two = np.where(frames > 0, frames & -frames, 1)
    wide = (band >= narrowest) & (gap <= band)
    keep = wide | ((gap <= narrowest) & ((frames == 0) | (band * largest_power_of_two >= narrowest)))
    if sink:
        keep |= k["t"] == 0
    return pool(keep, is_text, block_size)


def band_rule(layout: TokenLayout, order, block_size, width: float) -> np.ndarray:
    """A 1-D band of half-width ``width`` over the positions of ``order``."""
    s = layout.seq_len
    is_text = (order.numpy() < layout.video_offset) | (order.numpy() >= layout.video_offset + layout.video_len)
    position = np.arange(s)
    keep = np.abs(position[:, None] - position[None, :]) <= width
    return pool(keep, is_text, block_size)
