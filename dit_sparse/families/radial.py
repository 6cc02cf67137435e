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
"""

from __future__ import annotations

import math

import torch

from ..budget import Budget
from ..layout import TileShape, TokenLayout
from ..scoring import BestPerHead
from .cells import CellGrid
from .window import solve_window


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
        >>> mask.shape, round(mask.float().mean().item(), 3)      # the largest window within 0.2
        (torch.Size([64, 64]), 0.169)
    """
    return solve_window(radial_thresholds(layout, tile, block_size, sink), budget, layout, block_size, mass)


def fit_radial(
    mass: torch.Tensor, layout: TokenLayout, tile: TileShape, block_size: tuple[int, int], budget: Budget
) -> BestPerHead:
    """Per head, the radial mask with or without the first-frame sink, whichever serves ``budget``
    better on the measured ``mass`` (``[B, H, nQ, nK]``); an image has no sink frame."""
    best = BestPerHead(budget, layout, block_size)
    for sink in (True, False) if layout.grid[0] > 1 else (False,):
        thresholds = radial_thresholds(layout, tile, block_size, sink).to(mass.device)
        best.offer(solve_window(thresholds, budget, layout, block_size, mass), mass)
    return best


def _bit_length(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, torch.floor(torch.log2(x.clamp(min=1).double())) + 1, 0.0).long()
