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
