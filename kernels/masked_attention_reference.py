"""Dense attention under a token mask: the ground truth every sparse backend is tested against.

Materialises an ``S x S`` mask, so it is for tests and small shapes only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention restricted to ``mask``, computed in fp32; rows with no key give zeros.

    Args:
        q, k, v: ``[B, H, S, D]``.
        mask: boolean ``[B, H, S, S]`` (broadcastable); ``mask[b, h, i, j]``: query i sees key j.
        scale: softmax scale, default ``D ** -0.5``.

    Returns ``[B, H, S, D]`` in ``q``'s dtype.

    Example::

        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> mask = torch.ones(1, 2, 5, 5, dtype=torch.bool)
        >>> torch.allclose(masked_attention_reference(q, k, v, mask), F.scaled_dot_product_attention(q, k, v), atol=1e-6)
        True
    """
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
    empty = ~mask.any(-1, keepdim=True)
    return out.masked_fill(empty, 0.0).to(q.dtype)
