"""Cells, the resolution at which static families state their rules: one frame of one tile.

In a tile order a cell is a contiguous run of tokens (tokens inside a tile are in raster order),
and so is a block, so every block covers a contiguous range of cells. A rule that gives each cell
pair a threshold (the smallest window at which the pair is kept) becomes a block rule by taking
the smallest threshold over the block pair's cells: a block pair is kept as soon as any of its
token pairs is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import TileShape, TokenLayout


@dataclass(frozen=True)
class CellGrid:
    """The cells of a layout's tile order.

    Attributes:
        tile: the tile shape.
        frame, row, col: ``[nC]`` each cell's frame and tile position (tile row, tile column).
        of_token: ``[video_len]`` the cell of each video token, in tile order (non-decreasing).

    Example::

        >>> cells = CellGrid.of(TokenLayout((2, 4, 6)), (2, 4, 4))
        >>> cells.frame.tolist(), cells.col.tolist()
        ([0, 1, 0, 1], [0, 0, 1, 1])
    """

    tile: TileShape
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    of_token: torch.Tensor

    @classmethod
    def of(cls, layout: TokenLayout, tile: TileShape) -> CellGrid:
        coords = layout.video_coords()[layout.tile_order(tile)[: layout.video_len] - layout.video_offset]
        tiles = coords // torch.tensor(tile)
        rows, cols = (-(-g // s) for g, s in zip(layout.grid[1:], tile[1:]))
        tile_id = (tiles[:, 0] * rows + tiles[:, 1]) * cols + tiles[:, 2]
        cell_key = tile_id * tile[0] + coords[:, 0] % tile[0]
        _, of_token, sizes = torch.unique_consecutive(cell_key, return_inverse=True, return_counts=True)
        start = coords[torch.cumsum(sizes, 0) - sizes]
        return cls(tuple(tile), start[:, 0], start[:, 1] // tile[1], start[:, 2] // tile[2], of_token)

    def frame_distance(self) -> torch.Tensor:
        """``[nC, nC]`` frames between query cell and key cell."""
        return (self.frame[:, None] - self.frame[None, :]).abs()

    def spatial_distance(self) -> torch.Tensor:
        """``[nC, nC]`` distance in tokens between the two cells' tile positions."""
        dy = (self.row[:, None] - self.row[None, :]) * self.tile[1]
        dx = (self.col[:, None] - self.col[None, :]) * self.tile[2]
        return torch.sqrt((dy * dy + dx * dx).double())

    def pool_thresholds(
        self, thresholds: torch.Tensor, layout: TokenLayout, block_size: tuple[int, int]
    ) -> torch.Tensor:
        """Per block pair, the smallest threshold over its cell pairs: ``[..., nC, nC]`` to
        ``[..., nQ, nK]``. Text blocks get ``-inf`` (always kept)."""
        return pool_runs(thresholds, self.of_token, layout, block_size)


def pool_runs(
    thresholds: torch.Tensor, of_token: torch.Tensor, layout: TokenLayout, block_size: tuple[int, int]
) -> torch.Tensor:
    """Per block pair, the smallest threshold over the runs it covers.

    Args:
        thresholds: ``[..., nR, nR]`` per pair of runs (query run, key run).
        of_token: ``[video_len]`` the run of each video token of the order (non-decreasing: runs are
            contiguous in the order, as cells are in the tile order).

    Returns ``[..., nQ, nK]``; text blocks get ``-inf`` (always kept).

    Example::

        >>> runs = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])               # 8 video tokens in 3 runs
        >>> pool_runs(torch.arange(9.0).view(3, 3), runs, TokenLayout((1, 2, 4)), (4, 4))
        tensor([[0., 1.],
                [3., 4.]])
    """
    bq, bk = block_size
    out = torch.full(
        (*thresholds.shape[:-2], layout.num_blocks(bq), layout.num_blocks(bk)), float("-inf"), dtype=thresholds.dtype,
    )
    rows = _block_run_ranges(of_token, layout, bq)
    cols = _block_run_ranges(of_token, layout, bk)
    pooled = _range_min(_range_min(thresholds, *rows, dim=-2), *cols, dim=-1)
    out[..., : pooled.shape[-2], : pooled.shape[-1]] = pooled
    return out


def _block_run_ranges(of_token: torch.Tensor, layout: TokenLayout, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last run of each video block (blocks that hold no text)."""
    starts = torch.arange(layout.num_video_blocks(block)) * block
    ends = torch.clamp(starts + block, max=layout.video_len) - 1
    return of_token[starts], of_token[ends]


def _range_min(values: torch.Tensor, first: torch.Tensor, last: torch.Tensor, dim: int) -> torch.Tensor:
    """Minimum of ``values`` over the index range ``[first[i], last[i]]`` along ``dim``, for each i."""
    out = values.index_select(dim, first)
    widest = int((last - first).max()) if len(first) else 0
    for step in range(1, widest + 1):
        out = torch.minimum(out, values.index_select(dim, torch.minimum(first + step, last)))
    return out
