"""Solving a static family's window for a budget.

A static family gives every block pair a threshold: the smallest window at which the pair is kept
(``-inf`` for blocks always kept, ``inf`` for never). Growing the window only adds blocks, so a
budget picks one window per head.
"""

from __future__ import annotations

import torch

from ..budget import Budget
from ..layout import TokenLayout
from ..scoring import query_counts


def solve_window(
    thresholds: torch.Tensor,
    budget: Budget,
    layout: TokenLayout,
    block_size: tuple[int, int],
    mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """The block mask ``thresholds <= window`` for the window that serves ``budget``.

    Args:
        thresholds: ``[..., nQ, nK]`` per block pair, the smallest window that keeps it.
        budget: a count budget (density, ``alpha * n**C``) takes the largest window whose video
            density stays within it (the smallest window when even that one exceeds it); ``top_p``
            takes, per head, the smallest window whose measured recall reaches ``top_p``.
        mass: ``[B, H, nQ, nK]`` measured block mass (needed for ``top_p``).

    Example::

        >>> layout = TokenLayout((1, 8, 8))
        >>> band = (torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs().double()
        >>> solve_window(band, Budget(density=0.7), layout, (16, 16)).sum().item()   # |i - j| <= 1
        10
    """
    n_q, n_k = layout.num_video_blocks(block_size[0]), layout.num_video_blocks(block_size[1])
    video = thresholds[..., :n_q, :n_k]
    if video.numel() == 0:  # every query or every key block holds text: all are kept
        return torch.ones_like(thresholds, dtype=torch.bool)
    if budget.is_mass:
        if mass is None:
            raise ValueError("a top_p budget on a static family needs the measured block mass (mass=...)")
        window = _window_reaching_recall(video.expand(*mass.shape[:-2], n_q, n_k), mass, budget.top_p, layout, block_size[0])
    else:
        keep = budget.blocks_per_row(layout.seq_len, max(n_k, 1), block_size[1]) * n_q
        window = _largest_window_within(video.flatten(-2), keep)
    return thresholds <= window[..., None, None]


def _largest_window_within(thresholds: torch.Tensor, keep: int) -> torch.Tensor:
    """Per row of ``[..., n]``, the largest finite threshold that at most ``keep`` entries reach."""
    values = thresholds.sort(-1).values
    largest = _largest_finite(values)
    if keep >= values.shape[-1]:
        return largest
    first_out = values[..., keep : keep + 1].contiguous()
    below = torch.searchsorted(values.contiguous(), first_out).squeeze(-1) - 1
    window = values.gather(-1, below.clamp(min=0)[..., None]).squeeze(-1)
    return torch.minimum(torch.where(below >= 0, window, values[..., 0]), largest)


def _window_reaching_recall(
    thresholds: torch.Tensor, mass: torch.Tensor, top_p: float, layout: TokenLayout, block_q: int
) -> torch.Tensor:
    """Per head, the smallest threshold whose blocks (with the always-kept text) reach ``top_p``."""
    n_q, n_k = thresholds.shape[-2:]
    weights = query_counts(layout, block_q, mass.device)
    share = mass * (weights / weights.sum())[:, None]
    video_share = share[..., :n_q, :n_k].flatten(-2)
    always = share.sum((-1, -2)) - video_share.sum(-1)
    values, order = thresholds.flatten(-2).sort(-1)
    kept = always[..., None] + video_share.gather(-1, order).cumsum(-1)
    last_of_tie = torch.ones_like(values, dtype=torch.bool)
    last_of_tie[..., :-1] = values[..., 1:] != values[..., :-1]
    reaches = last_of_tie & (kept >= top_p - 1e-6) & values.isfinite()
    first = torch.where(reaches.any(-1), reaches.int().argmax(-1), values.shape[-1] - 1)
    return torch.minimum(values.gather(-1, first[..., None]).squeeze(-1), _largest_finite(values))


def _largest_finite(sorted_values: torch.Tensor) -> torch.Tensor:
    finite = sorted_values.masked_fill(~sorted_values.isfinite(), float("-inf"))
    return finite.max(-1).values
