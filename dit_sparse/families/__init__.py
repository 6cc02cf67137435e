"""Mask families: small pure functions from a layout (or a measured block mass) and a budget to a
block mask ``[..., nQ, nK]`` over a token order. The attention op does not know which made it."""

from .adaptive import adaptive_block_mask
from .radial import fit_radial, radial_block_mask, radial_thresholds
from .spatiotemporal import fit_spatiotemporal, spatiotemporal_block_mask, spatiotemporal_thresholds

__all__ = [
    "adaptive_block_mask",
    "fit_radial",
    "fit_spatiotemporal",
    "radial_block_mask",
    "radial_thresholds",
    "spatiotemporal_block_mask",
    "spatiotemporal_thresholds",
]
