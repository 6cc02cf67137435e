"""Mask families: small pure functions from a layout (or a measured block mass) and a budget to a
block mask ``[..., nQ, nK]`` over a token order. The attention op does not know which made it."""

from .adaptive import adaptive_block_mask
from .radial import fit_radial, radial_block_mask, radial_thresholds
from .semantic import SemanticClustering, cluster_heads, semantic_block_mask, semantic_block_mass
from .spatiotemporal import fit_spatiotemporal, spatiotemporal_block_mask, spatiotemporal_thresholds

__all__ = [
    "SemanticClustering",
    "adaptive_block_mask",
    "cluster_heads",
    "fit_radial",
    "fit_spatiotemporal",
    "radial_block_mask",
    "radial_thresholds",
    "semantic_block_mask",
    "semantic_block_mass",
    "spatiotemporal_block_mask",
    "spatiotemporal_thresholds",
]
