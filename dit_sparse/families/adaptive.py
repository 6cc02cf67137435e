"""The measured block mass itself: each query block keeps its heaviest key blocks."""

from __future__ import annotations

import torch

from ..budget import Budget, keep_heaviest
from ..layout import TokenLayout


def text_key_blocks(layout: TokenLayout, block_size_k: int) -> torch.Tensor:
    """Boolean ``[nK]``: key blocks holding any text token (always attended)."""
    blocks = torch.zeros(layout.num_blocks(block_size_k), dtype=torch.bool)
    blocks[layout.num_video_blocks(block_size_k) :] = True
    return blocks


def adaptive_block_mask(
    mass: torch.Tensor, layout: TokenLayout, block_size: tuple[int, int], budget: Budget
) -> torch.Tensor:
    """Keep, per query block, the key blocks with the most measured attention mass.

    Args:
        mass: ``[..., nQ, nK]`` block mass from :func:`dit_sparse.calibration.measure_block_mass`.
        block_size: ``(query, key)`` block sizes the mass was measured with.
        budget: a density, ``top_p`` or ``alpha * n**C`` budget; text key blocks come on top and
            text query blocks keep everything.

    Example::

        >>> from dit_sparse import TokenLayout
        >>> mass = torch.softmax(torch.randn(1, 4, 4), -1)
        >>> adaptive_block_mask(mass, TokenLayout((1, 8, 16)), (32, 32), Budget(density=0.5)).sum(-1)
        tensor([[2, 2, 2, 2]])
    """
    always = text_key_blocks(layout, block_size[1]).to(mass.device)
    mask = keep_heaviest(mass, budget, layout.seq_len, block_size[1], always=always)
    mask[..., layout.num_video_blocks(block_size[0]) :, :] = True
    return mask
