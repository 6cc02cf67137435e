"""The peers' own mask rules, as presets users can reproduce their papers with (see
docs/families.md, "Peer presets"): Radial Attention's static mask, SVG1's spatial and temporal
bands, SVG2's cluster-pair selection. Each is expressed as a block mask over one of our token
orders, so the same attention op runs it.
"""

from __future__ import annotations

import functools
import math

import torch

from ..budget import Budget
from ..layout import TokenLayout
from .semantic import SemanticClustering, _block_cluster_counts, _cluster_sizes
from .spatiotemporal import band_thresholds

RADIAL_DECAY = 0.2
RADIAL_SPLIT_THRESHOLD = 128  # tokens: the paper's hard-coded threshold for thinning far frame pairs
SVG1_PROFILE_ROWS = 64
SVG1_PROFILE_FIRST_TOKENS = 10_000
SVG1_PROFILE_FRAMES = 2
# SVG2's Wan 480p settings: 200 query and 1,000 key clusters for 21 x 30 x 52 = 32,760 video tokens.
SVG2_QUERIES_PER_CLUSTER = 32_760 / 200
SVG2_KEYS_PER_CLUSTER = 32_760 / 1_000
SVG2_MIN_KEY_CLUSTER_RATIO = 0.1
SVG2_KMEANS_ITERS = 50


def radial_paper_block_mask(layout: TokenLayout, block_size: int = 128, decay: float = RADIAL_DECAY) -> torch.Tensor:
    """Radial Attention's static mask ``[nQ, nK]`` over the raster order, as its code builds it.

    Per frame pair ``(i, j)`` with ``d = |i - j|`` and ``s`` tokens per frame, a token mask over the
    within-frame positions ``r`` (query) and ``c`` (key): key frame 0 whole (the sink); ``d <= 1``
    dense; otherwise ``|c - r| <= max(2**bit_length(s) * decay / 2**bit_length(d), block_size)``,
    and nothing at all when ``2**bit_length(s) / 2**bit_length(d) < 128`` and ``d`` is not a
    multiple of ``int(128 / that)`` (the thinning of far pairs). Each frame pair's mask is placed on
    the global grid of ``block_size`` blocks and shrunk: a block is kept when more than 60 % of its
    non-empty key columns have more than a third of the block's query rows kept. A block is kept if
    any frame pair keeps it. Sequences that are not a multiple of the block size are padded (the
    paper's code refuses them); text blocks are dense as in any plan.

    Example::

        >>> mask = radial_paper_block_mask(TokenLayout((16, 16, 16)), 128, decay=0.2)
        >>> mask.shape, round(mask.float().mean().item(), 3)
        (torch.Size([32, 32]), 0.688)
    """
    return _radial_paper(layout.grid, layout.text_len, layout.text_first, block_size, float(decay)).clone()


@functools.lru_cache(maxsize=16)
def _radial_paper(grid: tuple[int, int, int], text_len: int, text_first: bool, block: int, decay: float) -> torch.Tensor:
    layout = TokenLayout(grid, text_len, text_first)
    frames, s = grid[0], grid[1] * grid[2]
    n_q, n_k = layout.num_blocks(block), layout.num_blocks(block)
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    pos = torch.arange(s)
    gap = (pos[:, None] - pos[None, :]).abs()
    span = 2 ** s.bit_length()
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if j == 0 or d <= 1:
                local = torch.ones(s, s, dtype=torch.bool)
            else:
                decay_length = span / 2 ** d.bit_length()
                if decay_length < RADIAL_SPLIT_THRESHOLD and d % int(RADIAL_SPLIT_THRESHOLD / decay_length):
                    continue
                local = gap <= max(decay_length * decay, block)
            _or_shrunk(out, local, i * s, j * s, block)
    return out


def _or_shrunk(out: torch.Tensor, local: torch.Tensor, row0: int, col0: int, block: int) -> None:
    """Place ``local`` at token offset ``(row0, col0)`` on the block grid, shrink it (the 60 % /
    one-third column rule) and OR the kept blocks into ``out``."""
    s_r, s_c = local.shape
    pad_r, pad_c = row0 % block, col0 % block
    rows, cols = -(-(pad_r + s_r) // block), -(-(pad_c + s_c) // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.bool)
    padded[pad_r : pad_r + s_r, pad_c : pad_c + s_c] = local
    column_density = padded.view(rows, block, cols, block).sum(1).float() / block         # [rows, cols, block]
    nonzero = (column_density > 0).sum(-1)
    high = (column_density > 1 / 3).sum(-1)
    kept = high / (nonzero + 1e-9) > 0.6
    r0, c0 = row0 // block, col0 // block
    r1, c1 = min(out.shape[0], r0 + rows), min(out.shape[1], c0 + cols)
    out[r0:r1, c0:c1] |= kept[: r1 - r0, : c1 - c0]


def svg1_band_width(layout: TokenLayout, sparsity: float) -> int:
    """SVG1's band half-width in tokens: ``ceil(S * (1 - sqrt(1 - sparsity)) / 128) * 128`` for ``S``
    video tokens (``sparsity`` is the share of the ``S x S`` pairs a band of that width keeps).

    Example::

        >>> svg1_band_width(TokenLayout((21, 30, 52)), 0.25)
        4480
    """
    return math.ceil(layout.video_len * (1 - math.sqrt(1 - sparsity)) / 128) * 128


def svg1_block_mask(layout: TokenLayout, block_size: tuple[int, int], sparsity: float) -> torch.Tensor:
    """SVG1's mask ``[nQ, nK]`` over one token order (raster: a spatial head; position-major: a
    temporal head): the band ``|p_q - p_k| <= svg1_band_width`` plus the first frame's worth of
    keys (``p_k < H * W``, the sink), pooled to blocks (a block pair is kept when any token pair is;
    SVG1 masks inside blocks, so the blocks spend a little more).

    Example::

        >>> svg1_block_mask(TokenLayout((4, 8, 8)), (64, 64), 0.25).int()
        tensor([[1, 1, 1, 0],
                [1, 1, 1, 1],
                [1, 1, 1, 1],
                [1, 1, 1, 1]], dtype=torch.int32)
    """
    mask = band_thresholds(layout, block_size) <= svg1_band_width(layout, sparsity)
    frame = layout.grid[1] * layout.grid[2]
    mask[:, : -(-frame // block_size[1])] = True
    return mask


def svg1_profile_mask(layout: TokenLayout, block_size: tuple[int, int]) -> torch.Tensor:
    """SVG1's profiling mask ``[nQ, nK]``: a band of ``SVG1_PROFILE_FRAMES`` frames' worth of tokens,
    pooled to blocks; the error it leaves in each order decides a head's order."""
    return band_thresholds(layout, block_size) <= SVG1_PROFILE_FRAMES * layout.grid[1] * layout.grid[2]


def svg2_cluster_counts(layout: TokenLayout) -> tuple[int, int]:
    """SVG2's query and key clusters for a video, scaled from its 480p settings (200 / 1,000 for
    32,760 tokens), at most one per token.

    Example::

        >>> svg2_cluster_counts(TokenLayout((21, 30, 52))), svg2_cluster_counts(TokenLayout((21, 15, 26)))
        ((200, 1000), (50, 250))
    """
    n = layout.video_len
    return (max(1, min(n, round(n / SVG2_QUERIES_PER_CLUSTER))), max(1, min(n, round(n / SVG2_KEYS_PER_CLUSTER))))


def svg2_cluster_selection(clustering: SemanticClustering, budget: Budget, scale: float | None = None) -> torch.Tensor:
    """Boolean ``[B, H, Cq, Ck]``: the key clusters each query cluster keeps, by SVG2's rule.

    Centroid scores ``softmax_c(q_a . k_c * scale + log |c|)`` (weighted by key-cluster size); each
    query cluster keeps its key clusters heaviest first until their mass exceeds ``top_p`` (a
    ``top_p`` budget), or until they hold the budget's share of the video keys (a count budget: the
    same rule at equal density), and never fewer than ``floor(0.1 * Ck)``.

    Example::

        >>> from dit_sparse.families import cluster_heads
        >>> layout = TokenLayout((2, 8, 8))
        >>> clustering = cluster_heads(torch.randn(1, 128, 1, 16), torch.randn(1, 128, 1, 16), layout, 4, 20)
        >>> svg2_cluster_selection(clustering, Budget(top_p=0.9)).shape
        torch.Size([1, 1, 4, 20])
    """
    scale = clustering.q_centroids.shape[-1] ** -0.5 if scale is None else scale
    n_k = clustering.k_centroids.shape[-2]
    sizes = _cluster_sizes(clustering.k_labels, n_k)
    logits = scale * clustering.q_centroids @ clustering.k_centroids.transpose(-1, -2) + sizes.log()[..., None, :]
    probs = logits.softmax(-1)
    order = probs.argsort(dim=-1, descending=True)
    if budget.is_mass:
        ranked = probs.gather(-1, order)
        keep_sorted = (ranked.cumsum(-1) - ranked) <= budget.top_p      # until the mass kept exceeds top_p
    else:
        n = clustering.k_labels.shape[-1]
        keys = budget.blocks_per_row(n, n, 1)
        held = sizes[..., None, :].expand_as(probs).gather(-1, order)
        keep_sorted = (held.cumsum(-1) - held) < keys
    keep_sorted[..., : max(1, int(SVG2_MIN_KEY_CLUSTER_RATIO * n_k))] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def svg2_block_mask(
    clustering: SemanticClustering, layout: TokenLayout, block_size: tuple[int, int], budget: Budget
) -> torch.Tensor:
    """Boolean ``[B, H, nQ, nK]`` over the cluster orders: a block pair is kept when any query
    cluster it holds keeps any key cluster it holds (SVG2's blocks are the clusters themselves; on
    fixed blocks a block straddling clusters spends more).

    Example::

        >>> from dit_sparse.families import cluster_heads
        >>> layout = TokenLayout((4, 16, 16))
        >>> clustering = cluster_heads(torch.randn(1, 1024, 1, 16), torch.randn(1, 1024, 1, 16), layout, 8, 32)
        >>> svg2_block_mask(clustering, layout, (64, 64), Budget(top_p=0.9)).shape
        torch.Size([1, 1, 16, 16])
    """
    selection = svg2_cluster_selection(clustering, budget).float()
    q_in = _block_cluster_counts(clustering.q_labels, selection.shape[-2], layout, block_size[0]).clamp(max=1)
    k_in = _block_cluster_counts(clustering.k_labels, selection.shape[-1], layout, block_size[1]).clamp(max=1)
    mask = (q_in @ selection @ k_in.transpose(-1, -2)) > 0
    mask[..., layout.num_video_blocks(block_size[0]) :, :] = True
    mask[..., layout.num_video_blocks(block_size[1]) :] = True
    return mask
