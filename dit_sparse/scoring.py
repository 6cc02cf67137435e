"""How well a block mask serves a budget: the attention mass it keeps (recall), the share of key
blocks it spends (density), and the per-head choice among candidate masks."""

from __future__ import annotations

import torch

from .budget import Budget
from .layout import TokenLayout


def recall(
    mass: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, block_size_q: int, starts: tuple | None = None
) -> torch.Tensor:
    """``[B, H]`` share of the attention mass ``mask`` keeps, every query weighted equally.
    ``starts``: ``(q_starts, kv_starts)`` of variable blocks (``[B|1, H|1, n + 1]``).

    Example::

        >>> layout = TokenLayout((1, 4, 24))                      # 96 tokens: blocks of 64 and 32
        >>> mass = torch.tensor([[[[0.75, 0.25], [0.5, 0.5]]]])
        >>> recall(mass, torch.eye(2, dtype=torch.bool), layout, 64)
        tensor([[0.6667]])
    """
    kept = (mass * mask).sum(-1)
    if starts is None:
        weights = query_counts(layout, block_size_q, mass.device)
    else:
        bounds = starts[0].to(mass.device)
        weights = (bounds[..., 1:] - bounds[..., :-1]).float()
    return (kept * weights).sum(-1) / weights.sum(-1)


def query_counts(layout: TokenLayout, block_size_q: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[nQ]`` real queries in each query block (the last block may be partial)."""
    starts = torch.arange(layout.num_blocks(block_size_q), device=device) * block_size_q
    return torch.clamp(layout.seq_len - starts, max=block_size_q).float()


def video_density(
    mask: torch.Tensor, layout: TokenLayout, block_size: tuple[int, int], starts: tuple | None = None
) -> torch.Tensor:
    """Share of the video key blocks that the video query blocks keep (what a budget's density
    counts; text blocks come on top): ``[..., nQ, nK]`` to ``[...]``. With ``starts``
    (``(q_starts, kv_starts)`` of variable blocks) the share of video query-key pairs.

    Example::

        >>> layout = TokenLayout((1, 1, 6))
        >>> starts = (torch.tensor([0, 4, 6]), torch.tensor([0, 1, 6]))     # blocks of 4 + 2 and 1 + 5 tokens
        >>> video_density(torch.tensor([[True, False], [False, True]]), layout, (4, 5), starts).item()
        0.3888888888888889
    """
    if starts is not None:
        q_video, k_video = (_video_sizes(bounds.to(mask.device), layout) for bounds in starts)
        return (q_video[..., :, None] * mask * k_video[..., None, :]).sum((-1, -2)) / layout.video_len**2
    video = mask[..., : layout.num_video_blocks(block_size[0]), : layout.num_video_blocks(block_size[1])]
    if video.numel() == 0:
        return torch.ones(mask.shape[:-2], device=mask.device)
    return video.float().mean((-1, -2))


def _video_sizes(bounds: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Video tokens in each block that ``bounds`` (``[..., n + 1]``) delimit (the text sits last)."""
    ends = bounds.clamp(max=layout.video_len)
    return (ends[..., 1:] - ends[..., :-1]).double()


def target_density(budget: Budget, layout: TokenLayout, block_size_k: int) -> float | None:
    """The video density a count budget allows (``None`` for ``top_p``)."""
    if budget.is_mass:
        return None
    n_video = max(1, layout.num_video_blocks(block_size_k))
    return budget.blocks_per_row(layout.seq_len, n_video, block_size_k) / n_video


class BestPerHead:
    """Keeps, for each (batch, head), the candidate mask that serves a budget best.

    With a count budget (density or ``alpha * n**C``): the highest recall among candidates within
    the budget's density (if none is, the sparsest). With ``top_p``: the sparsest candidate that
    keeps ``top_p`` of the mass (if none does, the highest recall).

    Example::

        >>> best = BestPerHead(Budget(density=0.5), TokenLayout((1, 8, 8)), (16, 16))
        >>> mass = torch.full((1, 2, 4, 4), 0.25)
        >>> best.offer(torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4), mass)
        >>> best.offer(torch.ones(1, 2, 4, 4, dtype=torch.bool), mass)     # over budget
        >>> best.index.tolist()
        [[0, 0]]
    """

    def __init__(self, budget: Budget, layout: TokenLayout, block_size: tuple[int, int]) -> None:
        self.budget, self.layout, self.block_size = budget, layout, block_size
        self.target = target_density(budget, layout, block_size[1])
        self.count = 0
        self.mask = self.recall = self.density = self.index = self._score = None

    def offer(self, mask: torch.Tensor, mass: torch.Tensor) -> None:
        """Consider ``mask`` (``[B|1, H|1, nQ, nK]``) for every head, scored on ``mass``."""
        mask = mask.expand_as(mass)
        kept = recall(mass, mask, self.layout, self.block_size[0])
        density = video_density(mask, self.layout, self.block_size)
        better = self.offer_scores(kept, density)
        self.mask = mask.clone() if self.mask is None else torch.where(better[..., None, None], mask, self.mask)

    def offer_scores(self, kept: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
        """Consider a candidate by its ``[B, H]`` recall and video density alone (its mask is not
        kept: for candidates over different blocks); returns where it is the best so far."""
        density = density.to(kept.dtype)
        score = self._serve_score(kept, density)
        if self.index is None:
            better = torch.ones_like(kept, dtype=torch.bool)
            self.recall, self.density, self._score = kept, density, score
            self.index = torch.zeros_like(kept, dtype=torch.long)
        else:
            better = score > self._score
            self.recall = torch.where(better, kept, self.recall)
            self.density = torch.where(better, density, self.density)
            self._score = torch.where(better, score, self._score)
            self.index = torch.where(better, self.count, self.index)
        self.count += 1
        return better

    def _serve_score(self, kept: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            reaches = kept >= self.budget.top_p - 1e-6
            return torch.where(reaches, 2 - density, kept)
        fits = density <= self.target + 1e-6
        return torch.where(fits, 2 + kept, 1 - density)
