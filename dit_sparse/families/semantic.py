"""SVG2's semantic-aware permutation: cluster each head's queries and keys, sort tokens by cluster,
and keep the block pairs that the cluster centroids say carry the most attention.

Queries and keys are clustered separately (k-means per head, video tokens only), so a head gets
a query order and a key order, each with the video tokens sorted by cluster and the text last (its
own blocks). A query cluster's attention over key clusters is estimated from the centroids,
``softmax(q_c . k_c * scale + log |k cluster|)`` (centroid scores weighted by cluster size), and
spread over the blocks the clusters occupy. Each query block then keeps its heaviest key blocks of
that estimate under the budget, exactly as the adaptive family does with a measured mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import Budget
from ..kmeans import kmeans
from ..layout import TokenLayout
from .adaptive import adaptive_block_mask

QUERIES_PER_CLUSTER = 256
KEYS_PER_CLUSTER = 64


@dataclass
class SemanticClustering:
    """Per (batch, head) k-means of the video queries and keys.

    Attributes:
        q_labels, k_labels: ``[B, H, N]`` cluster of each video token (raster order).
        q_centroids, k_centroids: ``[B, H, C, D]`` (fp32); pass them as ``init`` to warm-start a
            later clustering.
    """

    q_labels: torch.Tensor
    k_labels: torch.Tensor
    q_centroids: torch.Tensor
    k_centroids: torch.Tensor

    def orders(self, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, H, S]`` query and key orders: video tokens sorted by cluster, then the text."""
        return _cluster_order(self.q_labels, layout), _cluster_order(self.k_labels, layout)


def cluster_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    query_clusters: int | None = None,
    key_clusters: int | None = None,
    iters: int = 10,
    seed: int = 0,
    init: SemanticClustering | None = None,
    heads: range | None = None,
    total_heads: int | None = None,
) -> SemanticClustering:
    """k-means of every head's video queries and keys, batched over batch and heads.

    Args:
        q, k: ``(B, S, H, D)`` as the attention call sees them.
        query_clusters, key_clusters: clusters per head; ``None``: one per
            ``QUERIES_PER_CLUSTER`` queries / ``KEYS_PER_CLUSTER`` keys.
        iters, seed: Lloyd iterations and the seed of the initial centroids.
        init: an earlier clustering of the same shape to start from (then a few ``iters`` do).
        heads, total_heads: the global indices of ``q``'s heads among the layer's ``total_heads``
            (one rank's slice under context parallelism): each head is clustered as it would be
            with every head present. Default: ``q`` holds them all.

    Example::

        >>> layout = TokenLayout((2, 8, 8))
        >>> q, k = torch.randn(1, 128, 2, 16), torch.randn(1, 128, 2, 16)
        >>> clustering = cluster_heads(q, k, layout, query_clusters=4, key_clusters=8)
        >>> clustering.q_labels.shape, clustering.k_centroids.shape
        (torch.Size([1, 2, 128]), torch.Size([1, 2, 8, 16]))
    """
    n = layout.video_len
    q_count = _cluster_count(query_clusters, n, QUERIES_PER_CLUSTER, "query_clusters")
    k_count = _cluster_count(key_clusters, n, KEYS_PER_CLUSTER, "key_clusters")
    seeding = (None, None)
    if heads is not None:
        rows = torch.arange(q.shape[0])[:, None] * total_heads + torch.tensor(list(heads))[None]
        seeding = (rows.reshape(-1), q.shape[0] * total_heads)
    q_init, k_init = (None, None) if init is None else (init.q_centroids, init.k_centroids)
    q_labels, q_centroids = _cluster_video(q, layout, q_count, iters, seed, q_init, *seeding)
    k_labels, k_centroids = _cluster_video(k, layout, k_count, iters, seed, k_init, *seeding)
    return SemanticClustering(q_labels, k_labels, q_centroids, k_centroids)


def semantic_block_mass(
    clustering: SemanticClustering, layout: TokenLayout, block_size: tuple[int, int], scale: float | None = None
) -> torch.Tensor:
    """``[B, H, nQ, nK]`` the centroid estimate of the block mass over the cluster orders: rows of
    blocks holding video queries sum to 1, text keys get none (text blocks are always kept).

    Example::

        >>> layout = TokenLayout((2, 8, 8))
        >>> clustering = cluster_heads(torch.randn(1, 128, 1, 16), torch.randn(1, 128, 1, 16), layout, 4, 8)
        >>> semantic_block_mass(clustering, layout, (32, 32)).sum(-1)
        tensor([[[1.0000, 1.0000, 1.0000, 1.0000]]])
    """
    scale = clustering.q_centroids.shape[-1] ** -0.5 if scale is None else scale
    k_sizes = _cluster_sizes(clustering.k_labels, clustering.k_centroids.shape[-2])
    logits = scale * clustering.q_centroids @ clustering.k_centroids.transpose(-1, -2) + k_sizes.log()[..., None, :]
    per_key = logits.softmax(-1) / k_sizes.clamp(min=1)[..., None, :]
    q_share = _block_cluster_counts(clustering.q_labels, clustering.q_centroids.shape[-2], layout, block_size[0])
    q_share = q_share / q_share.sum(-1, keepdim=True).clamp(min=1)
    k_count = _block_cluster_counts(clustering.k_labels, clustering.k_centroids.shape[-2], layout, block_size[1])
    return q_share @ per_key @ k_count.transpose(-1, -2)


def semantic_block_mask(
    clustering: SemanticClustering,
    layout: TokenLayout,
    block_size: tuple[int, int],
    budget: Budget,
    scale: float | None = None,
) -> torch.Tensor:
    """Boolean ``[B, H, nQ, nK]`` over the orders of :meth:`SemanticClustering.orders`: each query
    block's heaviest key blocks of the centroid estimate under ``budget`` (text blocks on top).

    Example::

        >>> layout = TokenLayout((4, 16, 16))
        >>> q, k = torch.randn(1, 1024, 2, 32), torch.randn(1, 1024, 2, 32)
        >>> mask = semantic_block_mask(cluster_heads(q, k, layout), layout, (64, 64), Budget(density=0.25))
        >>> mask.sum(-1).unique().tolist()
        [4]
    """
    return adaptive_block_mask(semantic_block_mass(clustering, layout, block_size, scale), layout, block_size, budget)


def _cluster_video(
    x: torch.Tensor, layout: TokenLayout, count: int, iters: int, seed: int, init: torch.Tensor | None,
    rows: torch.Tensor | None, total_rows: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    video = x[:, layout.video_offset : layout.video_offset + layout.video_len].transpose(1, 2)
    batch, heads, n, dim = video.shape
    labels, centroids = kmeans(
        video.reshape(batch * heads, n, dim), count, iters, seed, None if init is None else init.flatten(0, 1),
        rows, total_rows,
    )
    return labels.view(batch, heads, n), centroids.view(batch, heads, count, dim)


def _cluster_order(labels: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    video = labels.argsort(dim=-1, stable=True) + layout.video_offset
    text = torch.arange(layout.text_offset, layout.text_offset + layout.text_len, device=labels.device)
    return torch.cat([video, text.expand(*labels.shape[:-1], -1)], -1)


def _cluster_count(requested: int | None, points: int, per_cluster: int, name: str) -> int:
    if requested is None:
        return max(1, min(points, math.ceil(points / per_cluster)))
    if requested > points:
        raise ValueError(f"{name}={requested} exceeds the {points} video tokens; lower it or leave it None")
    return requested


def _cluster_sizes(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    sizes = torch.zeros(*labels.shape[:-1], num_clusters, device=labels.device)
    return sizes.scatter_add_(-1, labels, torch.ones_like(labels, dtype=sizes.dtype))


def _block_cluster_counts(labels: torch.Tensor, num_clusters: int, layout: TokenLayout, block: int) -> torch.Tensor:
    """``[B, H, nBlocks, C]`` tokens of each cluster in each block of the cluster order."""
    sorted_labels = labels.sort(-1).values
    blocks = torch.arange(labels.shape[-1], device=labels.device) // block
    index = blocks * num_clusters + sorted_labels
    counts = torch.zeros(*labels.shape[:-1], layout.num_blocks(block) * num_clusters, device=labels.device)
    counts.scatter_add_(-1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts.view(*labels.shape[:-1], layout.num_blocks(block), num_clusters)
