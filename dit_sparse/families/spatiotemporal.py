"""Spatio-temporal windows and stripes: SVG1's spatial and temporal heads, Sparse-vDiT's diagonal,
multi-diagonal and vertical-stripe modes, in one rule over 3-D tiles.

A query tile keeps the key tiles whose distance ``sqrt((frame_cost * dt)**2 + ds**2)`` is within
the window, ``dt`` being frames and ``ds`` the tokens between the two tiles' grid positions.
``frame_cost`` is what one frame of distance counts, in tokens:

- ``inf``: a spatial window of neighbour tiles in the query's own frame (growing the window never
  leaves the frame);
- large (16): a spatial window over the same and nearby frames (SVG1's spatial head, a
  diagonal band);
- ``0``: a temporal stripe, the same tile neighbourhood in every frame (SVG1's temporal head;
  in raster order these are Sparse-vDiT's frame-strided multi-diagonals).

``sink_blocks`` adds a vertical stripe: key blocks every query keeps.

:func:`band_thresholds` is SVG1's own form: a 1-D band of tokens in a token order, in the raster
order its spatial head (the same and nearby frames), in the position-major order
(:meth:`TokenLayout.position_order`) its temporal head (the same and nearby positions in every frame).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..budget import Budget
from ..layout import TileShape, TokenLayout
from ..scoring import BestPerHead
from .cells import CellGrid
from .window import WindowRule, solve_window

FRAME_COSTS = (0.0, 1.0, 4.0, 16.0, math.inf)


def spatiotemporal_thresholds(
    layout: TokenLayout, tile: TileShape, block_size: tuple[int, int], frame_cost: float
) -> torch.Tensor:
    """``[nQ, nK]`` the smallest window (tokens) at which each block pair enters the mask.

    Example::

        >>> layout = TokenLayout((3, 8, 16))
        >>> spatiotemporal_thresholds(layout, (1, 8, 8), (64, 64), frame_cost=4.0)[0].round(decimals=2).tolist()
        [0.0, 8.0, 4.0, 8.94, 8.0, 11.31]
    """
    cells = CellGrid.of(layout, tile)
    frames = cells.frame_distance().double()
    spatial = cells.spatial_distance()
    if math.isinf(frame_cost):
        thresholds = torch.where(frames == 0, spatial, math.inf)
    else:
        thresholds = torch.sqrt((frame_cost * frames) ** 2 + spatial**2)
    return cells.pool_thresholds(thresholds, layout, block_size)


def spatiotemporal_block_mask(
    layout: TokenLayout,
    tile: TileShape,
    block_size: tuple[int, int],
    budget: Budget,
    frame_cost: float,
    sink_blocks: torch.Tensor | None = None,
    mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block mask ``[..., nQ, nK]`` whose window is solved for ``budget``; the sink key blocks
    (boolean ``[..., nK]``, per head if given so) count towards it.

    Example::

        >>> layout = TokenLayout((8, 16, 16))
        >>> mask = spatiotemporal_block_mask(layout, (1, 8, 8), (64, 64), Budget(density=0.25), frame_cost=0.0)
        >>> mask.sum(-1).unique().tolist()        # the same tile in each of the 8 frames, nothing else
        [8]
    """
    thresholds = spatiotemporal_thresholds(layout, tile, block_size, frame_cost)
    return solve_window(thresholds, budget, layout, block_size, mass, sinks=sink_blocks)


def fit_spatiotemporal(
    mass: torch.Tensor,
    layout: TokenLayout,
    tile: TileShape,
    block_size: tuple[int, int],
    budget: Budget | Sequence[Budget],
) -> BestPerHead | list[BestPerHead]:
    """Per head, the frame cost (of :data:`FRAME_COSTS`) and vertical stripe (none, or the
    heaviest key blocks: a quarter of a count budget's blocks, 1/32 of the keys with ``top_p``)
    that serve ``budget`` best on the measured ``mass`` (``[B, H, nQ, nK]``), as SVG1 profiles
    its heads. A list of budgets gives one choice per budget."""
    costs = FRAME_COSTS if layout.grid[0] > 1 else (math.inf,)
    thresholds = [spatiotemporal_thresholds(layout, tile, block_size, cost).to(mass.device) for cost in costs]
    return fit_windows(thresholds, mass, layout, block_size, budget)


def fit_windows(
    thresholds: list[torch.Tensor],
    mass: torch.Tensor,
    layout: TokenLayout,
    block_size: tuple[int, int],
    budget: Budget | Sequence[Budget],
    stripes: bool = True,
) -> BestPerHead | list[BestPerHead]:
    """Per head and budget, the best of the windows of each of ``thresholds`` (``[nQ, nK]`` each,
    ranked once for every budget), each also with a vertical stripe of the heaviest key blocks
    (:func:`sink_key_blocks`) when ``stripes``."""
    budgets = [budget] if isinstance(budget, Budget) else list(budget)
    bests = [BestPerHead(one, layout, block_size) for one in budgets]
    sinks = [sink_key_blocks(mass, layout, block_size, _stripe_count(layout, block_size, one)) if stripes else None
             for one in budgets]
    for thresholds_of_rule in thresholds:
        rule = WindowRule(thresholds_of_rule, layout, block_size, mass)
        for best, one, mask, stripe in zip(bests, budgets, rule.masks(budgets), sinks, strict=True):
            best.offer(mask, mass)
            if stripe is not None:
                best.offer(rule.masks([one], stripe)[0], mass)
    return bests[0] if isinstance(budget, Budget) else bests


def band_thresholds(layout: TokenLayout, block_size: tuple[int, int]) -> torch.Tensor:
    """``[nQ, nK]`` tokens between the two blocks' position ranges in their (any) order: the smallest
    band half-width that keeps the pair (text blocks ``-inf``).

    Example::

        >>> band_thresholds(TokenLayout((1, 4, 8)), (8, 16))[0].tolist()
        [0.0, 9.0]
    """
    bq, bk = block_size
    n_q, n_k = layout.num_video_blocks(bq), layout.num_video_blocks(bk)
    q_first = torch.arange(n_q) * bq
    k_first = torch.arange(n_k) * bk
    q_last, k_last = (torch.clamp(f + b, max=layout.video_len) - 1 for f, b in ((q_first, bq), (k_first, bk)))
    gap = torch.maximum(k_first[None, :] - q_last[:, None], q_first[:, None] - k_last[None, :]).clamp(min=0)
    out = torch.full((layout.num_blocks(bq), layout.num_blocks(bk)), float("-inf"), dtype=torch.float64)
    out[:n_q, :n_k] = gap.double()
    return out


def fit_band(
    mass: torch.Tensor, layout: TokenLayout, block_size: tuple[int, int], budget: Budget | Sequence[Budget]
) -> BestPerHead | list[BestPerHead]:
    """Per head, the 1-D band over ``mass``'s order (``[B, H, nQ, nK]``, measured over the raster or
    the position-major order) with or without a vertical stripe, as :func:`fit_spatiotemporal`."""
    return fit_windows([band_thresholds(layout, block_size).to(mass.device)], mass, layout, block_size, budget)


def _stripe_count(layout: TokenLayout, block_size: tuple[int, int], budget: Budget) -> int:
    """Key blocks of a vertical stripe: a quarter of a count budget's blocks, 1/32 with ``top_p``."""
    n_k = layout.num_video_blocks(block_size[1])
    if budget.is_mass:
        return max(1, n_k // 32)
    return max(1, budget.blocks_per_row(layout.seq_len, max(n_k, 1), block_size[1]) // 4)


def sink_key_blocks(mass: torch.Tensor, layout: TokenLayout, block_size: tuple[int, int], count: int) -> torch.Tensor:
    """Boolean ``[B, H, nK]``: per head the ``count`` video key blocks with the most mean mass over
    the video query blocks (the columns a vertical stripe keeps)."""
    n_q, n_k = layout.num_video_blocks(block_size[0]), layout.num_video_blocks(block_size[1])
    column_mass = mass[..., :n_q, :n_k].mean(-2)
    top = column_mass.topk(min(count, n_k), dim=-1).indices
    sinks = torch.zeros(mass.shape[:-2] + (mass.shape[-1],), dtype=torch.bool, device=mass.device)
    return sinks.scatter_(-1, top, True)
