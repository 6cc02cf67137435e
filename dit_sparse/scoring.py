"""How well a block mask serves a budget: the attention mass it keeps (recall), the share of key
blocks it spends (density), and the per-head choice among candidate masks."""

from __future__ import annotations

import torch

from .budget import Budget
from .layout import TokenLayout


def recall(mass: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, block_size_q: int) -> torch.Tensor:
    """``[B, H]`` share of the attention mass ``mask`` keeps, every query weighted equally.

    Example::

        >>> layout = TokenLayout((1, 4, 24))                      # 96 tokens: blocks of 64 and 32
        >>> mass = torch.tensor([[[[0.75, 0.25], [0.5, 0.5]]]])
        >>> recall(mass, torch.eye(2, dtype=torch.bool), layout, 64)
        tensor([[0.6667]])
    """
    kept = (mass * mask).sum(-1)
    weights = query_counts(layout, block_size_q, mass.device)
    return (kept * weights).sum(-1) / weights.sum()


def query_counts(layout: TokenLayout, block_size_q: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[nQ]`` real queries in each query block (the last block may be partial)."""
    starts = torch.arange(layout.num_blocks(block_size_q), device=device) * block_size_q
    return torch.clamp(layout.seq_len - starts, max=block_size_q).float()


def video_density(mask: torch.Tensor, layout: TokenLayout, block_size: tuple[int, int]) -> torch.Tensor:
    """Share of the video key blocks that the video query blocks keep (what a budget's density
    counts; text blocks come on top): ``[..., nQ, nK]`` to ``[...]``."""
    video = mask[..., : layout.num_video_blocks(block_size[0]), : layout.num_video_blocks(block_size[1])]
    if video.numel() == 0:
        return torch.ones(mask.shape[:-2], device=mask.device)
    return video.float().mean((-1, -2))


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
        score = self._serve_score(kept, density)
        if self.mask is None:
            self.mask, self.recall, self.density, self._score = mask.clone(), kept, density, score
            self.index = torch.zeros_like(kept, dtype=torch.long)
        else:
            better = score > self._score
            self.mask = torch.where(better[..., None, None], mask, self.mask)
            self.recall = torch.where(better, kept, self.recall)
            self.density = torch.where(better, density, self.density)
            self._score = torch.where(better, score, self._score)
            self.index = torch.where(better, self.count, self.index)
        self.count += 1

    def _serve_score(self, kept: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            reaches = kept >= self.budget.top_p - 1e-6
            return torch.where(reaches, 2 - density, kept)
        fits = density <= self.target + 1e-6
        return torch.where(fits, 2 + kept, 1 - density)
