"""Mask families: small pure functions from a layout (or a measured block mass) and a budget to a
block mask ``[..., nQ, nK]`` over a token order. The attention op does not know which made it."""

from .adaptive import adaptive_block_mask

__all__ = ["adaptive_block_mask"]
