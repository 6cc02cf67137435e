"""Mask families: small pure functions from a layout (or a measured block mass) and a budget to a
block mask ``[..., nQ, nK]`` over a token order. The attention op does not know which made it."""

from .adaptive import adaptive_block_mask
from .radial import fit_radial, fit_radial_band, radial_band_thresholds, radial_block_mask, radial_thresholds
from .semantic import SemanticClustering, cluster_heads, semantic_block_mask, semantic_block_mass, semantic_block_masks
from .spatiotemporal import (
    band_thresholds,
    fit_band,
    fit_spatiotemporal,
    spatiotemporal_block_mask,
    spatiotemporal_thresholds,
)

__all__ = [
    "SemanticClustering",
    "adaptive_block_mask",
    "band_thresholds",
    "cluster_heads",
    "fit_band",
    "fit_radial",
    "fit_radial_band",
    "fit_spatiotemporal",
    "radial_band_thresholds",
    "radial_block_mask",
    "radial_thresholds",
    "semantic_block_mask",
    "semantic_block_mass",
    "semantic_block_masks",
    "spatiotemporal_block_mask",
    "spatiotemporal_thresholds",
]
