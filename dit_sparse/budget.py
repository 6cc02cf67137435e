"""How many key blocks a query block may keep: a fixed density, a mass to keep, or ``alpha * n**C``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    """One of three budgets (exactly one field set).

    - ``density``: fraction of the video key blocks each query block keeps.
    - ``top_p``: keep each row's heaviest key blocks until this share of its attention mass.
    - ``alpha`` (with ``exponent`` C): keep ``alpha * n ** C`` keys per query for ``n`` keys, never
      fewer than ``log2(n)``: a budget whose density falls as the sequence grows.

    Example::

        >>> Budget(alpha=4.0, exponent=0.5).blocks_per_row(num_keys=32768, num_blocks=512, block_size=64)
        12
    """

    density: float | None = None
    top_p: float | None = None
    alpha: float | None = None
    exponent: float = 0.5

    @classmethod
    def from_config(cls, config) -> Budget:
        return cls(config.density, config.top_p, config.alpha, config.exponent)

    @property
    def is_mass(self) -> bool:
        return self.top_p is not None

    def blocks_per_row(self, num_keys: int, num_blocks: int, block_size: int) -> int:
        """Key blocks per query block for a fixed-count budget (density or ``alpha * n**C``)."""
        if self.density is not None:
            keep = round(self.density * num_blocks)
        elif self.alpha is not None:
            keys = max(self.alpha * num_keys**self.exponent, math.log2(max(num_keys, 2)))
            keep = math.ceil(keys / block_size)
        else:
            raise ValueError("a top_p budget has no fixed block count; use keep_heaviest")
        return int(min(num_blocks, max(1, keep)))

    def keys_per_row(self, num_keys: int, video_keys: int) -> int:
        """Video keys per query for a fixed-count budget, counted in tokens (for blocks of
        variable size): the density's share of ``video_keys``, or ``alpha * n**C``.

        Example::

            >>> Budget(density=0.15).keys_per_row(num_keys=8200, video_keys=8190)
            1228
        """
        if self.density is not None:
            keep = round(self.density * video_keys)
        elif self.alpha is not None:
            keep = math.ceil(max(self.alpha * num_keys**self.exponent, math.log2(max(num_keys, 2))))
        else:
            raise ValueError("a top_p budget has no fixed key count; use keep_heaviest")
        return int(min(video_keys, max(1, keep)))


def keep_heaviest(
    mass: torch.Tensor, budget: Budget, num_keys: int, block_size: int, always: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask keeping each row's heaviest entries of ``mass`` (``[..., nQ, nK]``) under ``budget``.

    Columns in ``always`` (boolean ``[nK]``, e.g. text blocks) are kept on top of the budget's count
    and their mass counts towards ``top_p``. With ``top_p``, a row keeps its heaviest blocks until
    their mass reaches ``top_p`` of the row's total (always at least one); otherwise a fixed count
    of the other blocks.
    """
    n_k = mass.shape[-1]
    always = torch.zeros(n_k, dtype=torch.bool, device=mass.device) if always is None else always
    n_always = int(always.sum())
    rank_key = mass.masked_fill(always, float("inf"))
    order = torch.sort(rank_key, dim=-1, descending=True).indices
    if budget.is_mass:
        ranked = torch.gather(mass, -1, order)
        before = torch.cumsum(ranked, -1) - ranked
        keep_sorted = before < budget.top_p * ranked.sum(-1, keepdim=True)
        keep_sorted[..., : n_always + 1] = True
    else:
        keep = budget.blocks_per_row(num_keys, n_k - n_always, block_size)
        keep_sorted = torch.zeros_like(mass, dtype=torch.bool)
        keep_sorted[..., : n_always + keep] = True
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, order, keep_sorted)


def keep_heaviest_keys(
    mass: torch.Tensor, sizes: torch.Tensor, budget: Budget, num_keys: int, video_keys: int, always: torch.Tensor
) -> torch.Tensor:
    """:func:`keep_heaviest` for key blocks of variable size: ``sizes`` and ``always``
    (``[..., nK]``, broadcast against ``mass``'s rows) are each block's tokens and whether it is
    kept whatever the budget (text). A count budget keeps each row's heaviest other blocks, heaviest
    first, as long as the video keys kept stay within :meth:`Budget.keys_per_row` (and always the
    heaviest one); ``top_p`` as in :func:`keep_heaviest`. Empty blocks are never kept.

    Example::

        >>> mass = torch.tensor([[0.5, 0.3, 0.2]])
        >>> keep_heaviest_keys(mass, torch.tensor([10, 40, 50]), Budget(density=0.5), 100, 100, torch.zeros(3, dtype=torch.bool))
        tensor([[ True,  True, False]])
    """
    sizes, always = sizes.unsqueeze(-2).expand_as(mass), always.unsqueeze(-2).expand_as(mass)
    rank_key = mass.masked_fill(always, float("inf")).masked_fill(sizes == 0, float("-inf"))
    order = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices
    ranked_always = always.gather(-1, order)
    if budget.is_mass:
        ranked = mass.gather(-1, order)
        before = torch.cumsum(ranked, -1) - ranked
        keep_sorted = ranked_always | (before < budget.top_p * ranked.sum(-1, keepdim=True))
        keep_sorted[..., 0] = True
    else:
        held = sizes.gather(-1, order).masked_fill(ranked_always, 0)
        total = torch.cumsum(held, -1)
        keep_sorted = ranked_always | (total <= budget.keys_per_row(num_keys, video_keys)) | (total == held)
    keep_sorted &= sizes.gather(-1, order) > 0
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, order, keep_sorted)
