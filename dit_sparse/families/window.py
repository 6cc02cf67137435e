"""Solving a static family's window for a budget.

A static family gives every block pair a threshold: the smallest window at which the pair is kept
(``-inf`` for blocks always kept, ``inf`` for never). Growing the window only adds blocks. A count
budget keeps the block pairs with the smallest thresholds up to its count (so it is spent: the
pairs at the last window kept are taken heaviest first when the measured mass is given); ``top_p``
picks one window per head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..budget import Budget
from ..layout import TokenLayout
from ..scoring import query_counts


def solve_window(
    thresholds: torch.Tensor,
    budget: Budget | Sequence[Budget],
    layout: TokenLayout,
    block_size: tuple[int, int],
    mass: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """The block mask ``thresholds <= window`` for the window that serves ``budget``.

    Args:
        thresholds: ``[..., nQ, nK]`` per block pair, the smallest window that keeps it.
        budget: a count budget (density, ``alpha * n**C``) keeps its count of video block pairs
            with the smallest thresholds, ties broken by the measured mass (heaviest first) or else
            by position (never a pair of threshold ``inf``; every pair of ``-inf``, even beyond the
            count); ``top_p`` takes, per head, the smallest window whose measured recall reaches
            ``top_p``. A list of budgets gives a list of masks, the block pairs ranked once.
        mass: ``[B, H, nQ, nK]`` measured block mass (needed for ``top_p``).
        sinks: boolean ``[..., nK]`` key blocks every query keeps (a vertical stripe), counted in
            the budget.

    Example::

        >>> layout = TokenLayout((1, 8, 8))
        >>> band = (torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs().double()
        >>> solve_window(band, Budget(density=0.7), layout, (16, 16)).int()   # 12 pairs: |i - j| <= 1, two more
        tensor([[1, 1, 1, 0],
                [1, 1, 1, 1],
                [0, 1, 1, 1],
                [0, 0, 1, 1]], dtype=torch.int32)
        >>> [m.sum().item() for m in solve_window(band, [Budget(density=0.25), Budget(density=0.5)], layout, (16, 16))]
        [4, 8]
    """
    budgets = [budget] if isinstance(budget, Budget) else list(budget)
    masks = WindowRule(thresholds, layout, block_size, mass).masks(budgets, sinks)
    return masks[0] if isinstance(budget, Budget) else masks


class WindowRule:
    """One static rule's block pairs on one measured mass, ranked once for the masks of any number
    of budgets, with or without a vertical stripe (see :func:`solve_window`).

    Example::

        >>> layout = TokenLayout((1, 8, 8))
        >>> rule = WindowRule((torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs().double(), layout, (16, 16))
        >>> [m.sum().item() for m in rule.masks([Budget(density=0.25), Budget(density=0.5)])]
        [4, 8]
        >>> rule.masks([Budget(density=0.5)], sinks=torch.tensor([True, False, False, False]))[0][:, 0].tolist()
        [True, True, True, True]
    """

    def __init__(
        self, thresholds: torch.Tensor, layout: TokenLayout, block_size: tuple[int, int], mass: torch.Tensor | None = None
    ) -> None:
        self.thresholds, self.layout, self.block_size, self.mass = thresholds, layout, block_size, mass
        self.n_q, self.n_k = layout.num_video_blocks(block_size[0]), layout.num_video_blocks(block_size[1])
        self._ranking: _Ranking | None = None

    def masks(self, budgets: Sequence[Budget], sinks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One block mask per budget; ``sinks`` (boolean ``[..., nK]``) key blocks every query keeps."""
        n_q, n_k, mass = self.n_q, self.n_k, self.mass
        thresholds = _with_sinks(self.thresholds, sinks)
        video = thresholds[..., :n_q, :n_k]
        masks, ranked = [], None
        for one in budgets:
            if video.numel() == 0:  # every query or every key block holds text: all are kept
                masks.append(torch.ones_like(thresholds, dtype=torch.bool))
            elif one.is_mass:
                if mass is None:
                    raise ValueError("a top_p budget on a static family needs the measured block mass (mass=...)")
                window = _window_reaching_recall(
                    video.expand(*mass.shape[:-2], n_q, n_k), mass, one.top_p, self.layout, self.block_size[0]
                )
                masks.append(thresholds <= window[..., None, None])
            else:
                if self._ranking is None:
                    self._ranking = _Ranking.of(
                        self.thresholds[..., :n_q, :n_k], None if mass is None else mass[..., :n_q, :n_k]
                    )
                if ranked is None:
                    ranked = self._ranking.ranked(None if sinks is None else sinks[..., :n_k])
                chosen = ranked.smallest(one.blocks_per_row(self.layout.seq_len, max(n_k, 1), self.block_size[1]) * n_q)
                mask = (thresholds == float("-inf")).expand(*chosen.shape[:-2], *thresholds.shape[-2:]).clone()
                mask[..., :n_q, :n_k] = chosen
                masks.append(mask)
        return masks


@dataclass(frozen=True)
class _Ranking:
    """Block pairs in the order a count budget takes them: every ``-inf`` entry, each row's best
    entry, then the others; within each tier the smallest threshold first, ties broken by the
    largest ``mass``, else by the distance from the block diagonal, then by position (thresholds
    equal to 1e-9 tie). The pairs are sorted once by (threshold, tie, position); the tiers, which a stripe of always-kept key blocks
    changes, are applied by :meth:`ranked`.

    Attributes:
        thresholds, tie: ``[..., nQ, nK]`` (expanded to the mass's heads when it is given).
        order: ``[..., nQ * nK]`` flat positions sorted by (threshold, tie, position).
    """

    thresholds: torch.Tensor
    tie: torch.Tensor
    order: torch.Tensor

    @classmethod
    def of(cls, thresholds: torch.Tensor, mass: torch.Tensor | None) -> _Ranking:
        n_q, n_k = thresholds.shape[-2:]
        if mass is not None:
            thresholds, tie = thresholds.expand_as(mass), -mass
        else:
            diagonal = torch.arange(n_q, device=thresholds.device)[:, None] * (n_k / n_q)
            tie = (diagonal - torch.arange(n_k, device=thresholds.device)[None, :]).abs().expand_as(thresholds)
        # distances computed along different paths may differ in their last bits: equal to 1e-9, they tie
        flat_thresholds = thresholds.flatten(-2).round(decimals=9)
        order = tie.flatten(-2).argsort(dim=-1, stable=True)
        order = order.gather(-1, flat_thresholds.gather(-1, order).argsort(dim=-1, stable=True))
        return cls(thresholds, tie, order)

    def ranked(self, sinks: torch.Tensor | None = None) -> _Ranked:
        """Each pair's place in the order a count budget takes them, with ``sinks`` (boolean
        ``[..., nK]``) as ``-inf`` columns: one ranking for the masks of any number of counts
        (:meth:`_Ranked.smallest`)."""
        thresholds = _with_sinks(self.thresholds, sinks)
        tie = self.tie.expand_as(thresholds)
        tier = torch.where(thresholds == float("-inf"), 0, torch.where(_row_best(thresholds, tie), 1, 2)).flatten(-2)
        order = self.order.expand_as(tier)
        ranked_tier = tier.gather(-1, order)
        before_one = (tier == 0).sum(-1, keepdim=True)
        before_two = before_one + (tier == 1).sum(-1, keepdim=True)
        rank = torch.where(ranked_tier == 1, before_one + (ranked_tier == 1).cumsum(-1),
                           before_two + (ranked_tier == 2).cumsum(-1)) - 1
        finite = thresholds.flatten(-2).gather(-1, order) < float("inf")
        return _Ranked(order, ranked_tier == 0, torch.where(finite, rank, torch.iinfo(rank.dtype).max), thresholds.shape[-2:])


@dataclass(frozen=True)
class _Ranked:
    """Block pairs in :class:`_Ranking`'s order with their rank among those a count may take
    (``always``: the ``-inf`` tier, taken whatever the count; an ``inf`` pair's rank is never
    reached)."""

    order: torch.Tensor
    always: torch.Tensor
    rank: torch.Tensor
    shape: torch.Size

    def smallest(self, keep: int) -> torch.Tensor:
        """Boolean ``[..., nQ, nK]``: the ``-inf`` pairs, then the first ``keep`` others in all
        (never an ``inf``)."""
        take = self.always | (self.rank < keep)
        return torch.zeros_like(take).scatter_(-1, self.order, take).unflatten(-1, self.shape)


def _with_sinks(thresholds: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    return thresholds if sinks is None else thresholds.masked_fill(sinks[..., None, :], float("-inf"))


def _row_best(thresholds: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """Boolean, one entry per row: the smallest threshold, ties by the smallest ``tie``, then the first."""
    at_best = thresholds == thresholds.amin(-1, keepdim=True)
    best_tie = torch.where(at_best, tie, float("inf")).amin(-1, keepdim=True)
    first = (at_best & (tie == best_tie)).int().argmax(-1, keepdim=True)
    return torch.zeros_like(at_best).scatter_(-1, first, True)


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
