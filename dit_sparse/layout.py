"""Where every token of a diffusion transformer's joint sequence sits.

A :class:`TokenLayout` describes the sequence that a self-attention call sees: a video (or image)
grid of ``T x H x W`` tokens in frame-major raster order (token ``t*H*W + h*W + w``), and an
optional run of text tokens before or after it. Token orders (gather indices) are built from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TileShape = tuple[int, int, int]


@dataclass(frozen=True)
class TokenLayout:
    """The token grid of one attention call.

    Args:
        grid: ``(T, H, W)`` video grid in tokens (an image is ``(1, H, W)``).
        text_len: number of text tokens in the same sequence (0 when text only enters through
            cross-attention).
        text_first: whether the text tokens come before the video tokens (CogVideoX, Flux) or after
            them (HunyuanVideo).
        valid_text_len: per batch element, how many of the text tokens are real; the rest are
            padding that no query may attend (HunyuanVideo pads its prompt). ``None``: all real.

    Example::

        >>> layout = TokenLayout(grid=(4, 6, 10), text_len=7)
        >>> layout.seq_len, layout.num_blocks(64)
        (247, 4)
        >>> order = layout.tile_order((1, 4, 4))
        >>> bool((order[layout.inverse(order)] == torch.arange(247)).all())
        True
    """

    grid: tuple[int, int, int]
    text_len: int = 0
    text_first: bool = False
    valid_text_len: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        grid = tuple(int(g) for g in self.grid)
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"TokenLayout.grid must be three positive ints (T, H, W), got {self.grid!r}")
        object.__setattr__(self, "grid", grid)
        if self.text_len < 0:
            raise ValueError(f"TokenLayout.text_len must be >= 0, got {self.text_len}")
        if self.valid_text_len is not None:
            valid = tuple(int(v) for v in self.valid_text_len)
            bad = [v for v in valid if not 0 <= v <= self.text_len]
            if not valid or bad:
                raise ValueError(
                    f"TokenLayout.valid_text_len must hold one count in [0, text_len={self.text_len}] per "
                    f"batch element, got {self.valid_text_len!r}"
                )
            object.__setattr__(self, "valid_text_len", valid)

    @property
    def video_len(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def seq_len(self) -> int:
        return self.video_len + self.text_len

    @property
    def video_offset(self) -> int:
        """Position of the first video token in the original sequence."""
        return self.text_len if self.text_first else 0

    @property
    def text_offset(self) -> int:
        """Position of the first text token in the original sequence."""
        return 0 if self.text_first else self.video_len

    @property
    def geometry(self) -> tuple[tuple[int, int, int], int, bool]:
        """What a plan depends on: grid, text length and side (not the per-prompt padding)."""
        return self.grid, self.text_len, self.text_first

    def with_valid_text_len(self, valid_text_len: tuple[int, ...] | None) -> TokenLayout:
        """The same geometry with another per-batch text padding."""
        return TokenLayout(self.grid, self.text_len, self.text_first, valid_text_len)

    def num_blocks(self, block_size: int) -> int:
        """Blocks of ``block_size`` tokens covering the sequence (the last one may be partial)."""
        return -(-self.seq_len // block_size)

    def num_video_blocks(self, block_size: int) -> int:
        """Leading blocks of a permuted sequence that hold only video; the blocks after them hold
        text (every order puts the text last)."""
        return self.video_len // block_size if self.text_len else self.num_blocks(block_size)

    def key_valid_len(self, batch_size: int) -> torch.Tensor | None:
        """Per batch element, how many leading positions of a permuted sequence are real keys.

        Every token order keeps the text, in its own order, at the end, so text padding always sits
        at the tail of the permuted sequence. ``None`` when there is no padding.
        """
        if self.valid_text_len is None:
            return None
        valid = torch.tensor(self.valid_text_len, dtype=torch.int32) + self.video_len
        if valid.numel() == 1:
            return valid.expand(batch_size).contiguous()
        if valid.numel() != batch_size:
            raise ValueError(
                f"layout has valid_text_len for {valid.numel()} batch elements but the batch has {batch_size}"
            )
        return valid

    def key_padding(self, batch_size: int) -> torch.Tensor:
        """Boolean ``[B, S]`` in the original order: the text padding no query may attend.

        Example::

            >>> TokenLayout((1, 1, 2), text_len=3, valid_text_len=(1,)).key_padding(1).tolist()
            [[False, False, False, True, True]]
        """
        padding = torch.zeros(batch_size, self.seq_len, dtype=torch.bool)
        valid = self.key_valid_len(batch_size)
        if valid is not None:
            text_position = torch.arange(self.seq_len) - self.text_offset
            in_text = (text_position >= 0) & (text_position < self.text_len)
            padding = in_text[None] & (text_position[None] >= (valid - self.video_len)[:, None])
        return padding

    def video_coords(self) -> torch.Tensor:
        """``[video_len, 3]`` (t, h, w) of each video token, in raster order."""
        t, h, w = self.grid
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)], dim=1)

    def identity_order(self) -> torch.Tensor:
        """The order that keeps video tokens in raster order, followed by the text tokens."""
        return self._with_text(torch.arange(self.video_len))

    def position_order(self) -> torch.Tensor:
        """The position-major order (SVG1's temporal heads): token ``(t, h, w)`` at permuted position
        ``(h * W + w) * T + t``, so the frames of one position are adjacent; text last.

        Example::

            >>> TokenLayout((2, 1, 3)).position_order().tolist()
            [0, 3, 1, 4, 2, 5]
        """
        frames = self.grid[0]
        return self._with_text(torch.arange(self.video_len).view(frames, -1).T.reshape(-1))

    def tile_order(self, tile: TileShape) -> torch.Tensor:
        """A permutation that groups the video into ``tile = (t, h, w)`` spatio-temporal tiles.

        Tiles follow each other in raster order over the tile grid; tokens inside a tile in raster
        order. Edge tiles are partial when the grid is not a multiple of the tile. Text tokens come
        last. ``order[p]`` is the original position of the token at permuted position ``p``.
        """
        tile = _check_tile(tile)
        coords = self.video_coords()
        tile_idx = coords // torch.tensor(tile)
        tiles_per_dim = [-(-g // s) for g, s in zip(self.grid, tile)]
        tile_id = (tile_idx[:, 0] * tiles_per_dim[1] + tile_idx[:, 1]) * tiles_per_dim[2] + tile_idx[:, 2]
        raster = torch.arange(self.video_len)
        key = tile_id * self.video_len + raster
        return self._with_text(torch.argsort(key))

    def _with_text(self, video_order: torch.Tensor) -> torch.Tensor:
        text = torch.arange(self.text_offset, self.text_offset + self.text_len)
        return torch.cat([video_order + self.video_offset, text])

    @staticmethod
    def inverse(order: torch.Tensor) -> torch.Tensor:
        """The inverse permutation (over the last dimension): ``inverse(order)[order] == arange``."""
        inv = torch.empty_like(order)
        inv.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return inv


def _check_tile(tile: TileShape) -> TileShape:
    tile = tuple(int(s) for s in tile)
    if len(tile) != 3 or min(tile) < 1:
        raise ValueError(f"a tile shape is three positive ints (t, h, w), got {tile!r}")
    return tile
