"""Radial Attention's spatio-temporal energy decay over 3-D tiles.

A query tile keeps the key tiles within a spatial window around its own position. Within one frame
of distance (``d <= 1``) the window has radius ``window`` tokens; each time the frame distance
doubles the window's area halves (its radius shrinks by sqrt 2). The same tile position is always
kept in its own frame; in another frame it is kept while the window still covers a tile's area,
and beyond that only every ``2**j``-th frame pair keeps it, ``2**j`` being the factor by which the
window has become smaller than a tile (the paper's decimation of far frame pairs). The first frame
can act as an attention sink that every query keeps. With a large window, frames within +-1 of the
query are dense, as in the paper.

Distances between tiles are measured between their positions on the tile grid, in tokens.

:func:`radial_band_thresholds` states the paper's own form over the raster order instead: a 1-D band
of within-frame positions per frame pair, its half-width halving each time the frame distance
doubles, never narrower than one key block but then thinned to every ``2**j``-th frame pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..budget import Budget
from ..layout import TileShape, TokenLayout
from ..scoring import BestPerHead
from .cells import CellGrid, pool_runs
from .spatiotemporal import fit_windows
from .window import solve_window

NEIGHBOUR_WIDENING = 16.0   # the paper's mask at decay 0.2: frames +-1 dense, +-2 a band of 1/20 of a frame


def radial_thresholds(
    layout: TokenLayout, tile: TileShape, block_size: tuple[int, int], sink: bool = True
) -> torch.Tensor:
    """``[nQ, nK]`` the smallest window radius (tokens) at which each block pair enters the mask.

    Example::

        >>> layout = TokenLayout((4, 8, 8))
        >>> radial_thresholds(layout, (1, 8, 8), (64, 64), sink=False)[0].round(decimals=2).tolist()
        [0.0, 4.51, 4.51, 6.38]
    """
    cells = CellGrid.of(layout, tile)
    frames = cells.frame_distance()
    decay = 2.0 ** (_bit_length(frames) - 1).clamp(min=0).double()
    tile_area = tile[1] * tile[2]
    # In another frame, the same tile position needs a window covering a tile's area, scaled up by
    # the decay and down by the largest power of two dividing the frame distance (decimation).
    divides = (frames & -frames).clamp(min=1).double()
    same_position = torch.sqrt(tile_area * decay / (math.pi * divides))
    spatial = cells.spatial_distance()
    thresholds = torch.where(
        spatial > 0,
        torch.maximum(spatial * decay.sqrt(), torch.sqrt(tile_area * decay / math.pi)),
        torch.where(frames == 0, 0.0, same_position),
    )
    if sink:
        thresholds[:, cells.frame == 0] = 0.0
    return cells.pool_thresholds(thresholds, layout, block_size)


def radial_block_mask(
    layout: TokenLayout,
    tile: TileShape,
    block_size: tuple[int, int],
    budget: Budget,
    sink: bool = True,
    mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Radial block mask ``[nQ, nK]`` (``[B, H, nQ, nK]`` with ``top_p``) whose window is solved
    for ``budget`` (``top_p`` needs the measured ``mass``).

    Example::

        >>> layout = TokenLayout((16, 16, 16))
        >>> mask = radial_block_mask(layout, (1, 8, 8), (64, 64), Budget(density=0.2))
        >>> mask.shape, round(mask.float().mean().item(), 3)      # 13 of 64 key blocks per row on average
        (torch.Size([64, 64]), 0.203)
    """
    return solve_window(radial_thresholds(layout, tile, block_size, sink), budget, layout, block_size, mass)


def fit_radial(
    mass: torch.Tensor, layout: TokenLayout, tile: TileShape, block_size: tuple[int, int], budget: Budget | Sequence[Budget]
) -> BestPerHead | list[BestPerHead]:
    """Per head, the radial mask with or without the first-frame sink, whichever serves ``budget``
    better on the measured ``mass`` (``[B, H, nQ, nK]``); an image has no sink frame. A list of
    budgets gives one choice per budget."""
    sinks = (True, False) if layout.grid[0] > 1 else (False,)
    rules = [radial_thresholds(layout, tile, block_size, sink).to(mass.device) for sink in sinks]
    return fit_windows(rules, mass, layout, block_size, budget, stripes=False)


def radial_band_thresholds(
    layout: TokenLayout, block_size: tuple[int, int], sink: bool = True, neighbours: bool = False
) -> torch.Tensor:
    """``[nQ, nK]`` over the raster order (:meth:`TokenLayout.identity_order`): the smallest band
    half-width ``w`` (tokens, at frame distance ``d <= 1``) at which each block pair enters the mask.

    For query frame ``i`` and key frame ``j`` at ``d = |i - j|`` the band's half-width is
    ``w * 2 / 2**bit_length(max(d, 1))`` (the paper's decay: ``d`` of 0 or 1 full width, 2-3 half,
    4-7 a quarter, ...). A token pair whose within-frame positions ``r, c`` lie ``|c - r| > m`` apart
    (``m``: the key block size) is kept when the band reaches it; a nearer pair once the band is at
    least ``m / 2**v`` wide, ``2**v`` being the largest power of two dividing ``d`` (the band never
    narrows below ``m``: once it would be ``2**j`` times narrower, only every ``2**j``-th frame pair
    keeps it). The same frame keeps its positions within ``m`` at any width. ``sink``: every query
    keeps frame 0. With ``w`` at least the frame's length, frames within +-1 are dense, as in the paper.
    ``neighbours``: frames within +-1 get a band :data:`NEIGHBOUR_WIDENING` times wider, so that they
    are dense while farther frames keep a narrow band, the shape of the paper's own mask
    (:func:`~dit_sparse.families.peers.radial_paper_block_mask`) at any density.

    Example::

        >>> t = radial_band_thresholds(TokenLayout((5, 4, 8)), (32, 32), sink=False)   # a block is a frame
        >>> t[0].tolist()                        # key frames 0..4 seen from frame 0: 4 is thinned less than 3
        [0.0, 32.0, 32.0, 64.0, 32.0]
    """
    frame_len = layout.grid[1] * layout.grid[2]
    bq, bk = block_size
    pos = torch.arange(layout.video_len)
    starts_run = (pos % bq == 0) | (pos % bk == 0) | (pos % frame_len == 0)
    of_token = torch.cumsum(starts_run.long(), 0) - 1
    starts = pos[starts_run]
    ends = torch.cat([starts[1:], torch.tensor([layout.video_len])]) - 1
    frame, first, last = starts // frame_len, starts % frame_len, ends % frame_len
    d = (frame[:, None] - frame[None, :]).abs()
    gap = torch.maximum(first[None, :] - last[:, None], first[:, None] - last[None, :]).clamp(min=0).double()
    divides = torch.where(d > 0, (d & -d).double(), math.inf)
    width = torch.where(gap > bk, gap, bk / divides)
    thresholds = width * 2.0 ** (_bit_length(d.clamp(min=1)) - 1).double()
    if neighbours:
        thresholds = torch.where(d <= 1, thresholds / NEIGHBOUR_WIDENING, thresholds)
    if sink:
        thresholds[:, frame == 0] = 0.0
    return pool_runs(thresholds, of_token, layout, block_size)


def fit_radial_band(
    mass: torch.Tensor, layout: TokenLayout, block_size: tuple[int, int], budget: Budget | Sequence[Budget],
    neighbours: bool = False,
) -> BestPerHead | list[BestPerHead]:
    """As :func:`fit_radial` for the raster band (``mass`` measured over the raster order), the
    neighbouring frames widened with ``neighbours`` (see :func:`radial_band_thresholds`)."""
    sinks = (True, False) if layout.grid[0] > 1 else (False,)
    rules = [radial_band_thresholds(layout, block_size, sink, neighbours).to(mass.device) for sink in sinks]
    return fit_windows(rules, mass, layout, block_size, budget, stripes=False)


def _bit_length(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, torch.floor(torch.log2(x.clamp(min=1).double())) + 1, 0.0).long()
