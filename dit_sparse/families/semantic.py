"""SVG2's semantic-aware permutation: cluster each head's queries and keys, sort tokens by cluster,
and keep the block pairs that the cluster centroids say carry the most attention.

Queries and keys are clustered separately (k-means per head, video tokens only), so a head gets
a query order and a key order, each with the video tokens sorted by cluster and the text last (its
own blocks). A query cluster's attention over key clusters is estimated from the centroids,
``softmax(q_c . k_c * scale + log |k cluster|)`` (centroid scores weighted by cluster size), and
spread over the blocks the clusters occupy. Each query block then keeps its heaviest key blocks of
that estimate under the budget, exactly as the adaptive family does with a measured mass.

On fixed blocks a block straddles clusters. Cluster-aligned blocks (:func:`cluster_block_starts`)
cut each cluster into blocks of its own: whole clusters are kept, and the budget counts tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import Budget, keep_heaviest_keys
from ..kmeans import cluster_means, kmeans
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

    def block_starts(self, layout: TokenLayout, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, H, n + 1]`` query and key block boundaries over :meth:`orders` that align with the
        clusters (see :func:`cluster_block_starts`)."""
        return (
            cluster_block_starts(self.q_labels, self.q_centroids.shape[-2], layout, block_size[0]),
            cluster_block_starts(self.k_labels, self.k_centroids.shape[-2], layout, block_size[1]),
        )


def cluster_block_starts(labels: torch.Tensor, num_clusters: int, layout: TokenLayout, block: int) -> torch.Tensor:
    """``[B, H, n + 1]`` block boundaries over the cluster order of ``labels`` (``[B, H, N]``): each
    cluster cut into blocks of ``block`` tokens (its last one partial), so that no block holds two
    clusters; then empty blocks, so that every head has ``ceil(N / block) + C`` video blocks; then
    the text in blocks of ``block``.

    Example::

        >>> labels = torch.tensor([[[0, 1, 0, 2, 0, 0, 1]]])              # clusters of 4, 2 and 1 tokens
        >>> cluster_block_starts(labels, 3, TokenLayout((1, 1, 7), text_len=3), 2).tolist()
        [[[0, 2, 4, 6, 7, 7, 7, 7, 9, 10]]]
    """
    n = labels.shape[-1]
    sizes = _cluster_sizes(labels, num_clusters).long()                                    # [B, H, C]
    per_cluster = -(-sizes // block)
    ends = per_cluster.cumsum(-1)
    slots = torch.arange(-(-n // block) + num_clusters, device=labels.device)
    cluster = torch.searchsorted(ends, slots.expand(*ends.shape[:-1], -1).contiguous(), right=True)
    inside = cluster < num_clusters
    cluster = cluster.clamp(max=num_clusters - 1)
    within = slots - (ends - per_cluster).gather(-1, cluster)
    video = torch.where(inside, (sizes.gather(-1, cluster) - within * block).clamp(0, block), 0)
    text_starts = torch.arange(0, layout.text_len, block, device=labels.device)
    text = (text_starts + block).clamp(max=layout.text_len) - text_starts
    lengths = torch.cat([video, text.expand(*video.shape[:-1], -1)], -1)
    return torch.nn.functional.pad(lengths.cumsum(-1), (1, 0))


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


def split_key_clusters(clustering: SemanticClustering, k: torch.Tensor, layout: TokenLayout, iters: int = 10) -> SemanticClustering:
    """The same clustering with each key cluster split in two (cluster ``c`` into ``2c`` and
    ``2c + 1``): its keys start in halves by position and move, for ``iters`` rounds, to the nearer
    of the two halves' means; a key never leaves its cluster, so the rounds cost ``O(N D)``. The
    queries' clusters are unchanged, and so is the order of the keys' clusters.

    Args:
        clustering: the clustering of ``k`` (:func:`cluster_heads`).
        k: ``(B, S, H, D)`` the keys it clustered.

    Example::

        >>> layout = TokenLayout((2, 8, 8))
        >>> q, k = torch.randn(1, 128, 1, 16), torch.randn(1, 128, 1, 16)
        >>> coarse = cluster_heads(q, k, layout, 4, 8)
        >>> fine = split_key_clusters(coarse, k, layout)
        >>> fine.k_centroids.shape, bool((fine.k_labels // 2 == coarse.k_labels).all())
        (torch.Size([1, 1, 16, 16]), True)
    """
    video = k[:, layout.video_offset : layout.video_offset + layout.video_len].transpose(1, 2).float()
    batch, heads, n, dim = video.shape
    parent = clustering.k_labels.reshape(-1, n)
    count = clustering.k_centroids.shape[-2]
    x = video.reshape(-1, n, dim)
    sizes = _cluster_sizes(parent, count).long()
    rank = torch.empty_like(parent).scatter_(-1, parent.argsort(dim=-1, stable=True), torch.arange(n, device=parent.device).expand_as(parent))
    rank = rank - (sizes.cumsum(-1) - sizes).gather(-1, parent)
    labels = 2 * parent + (2 * rank >= sizes.gather(-1, parent)).long()
    centroids = clustering.k_centroids.reshape(-1, count, 1, dim).expand(-1, -1, 2, -1).reshape(-1, 2 * count, dim)
    index = parent[..., None].expand(-1, -1, dim)
    for _ in range(iters + 1):
        centroids = cluster_means(x, labels, centroids)
        first, second = centroids.view(-1, count, 2, dim).unbind(2)
        # nearer the second mean: x . (second - first) > (|second|^2 - |first|^2) / 2
        towards = (second - first).gather(1, index)
        bound = 0.5 * ((second * second).sum(-1) - (first * first).sum(-1))
        labels = 2 * parent + ((x * towards).sum(-1) > bound.gather(1, parent)).long()
    return SemanticClustering(clustering.q_labels, labels.view(batch, heads, n), clustering.q_centroids,
                              centroids.view(batch, heads, 2 * count, dim))


def semantic_block_mass(
    clustering: SemanticClustering,
    layout: TokenLayout,
    block_size: tuple[int, int],
    scale: float | None = None,
    starts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[B, H, nQ, nK]`` the centroid estimate of the block mass over the cluster orders: rows of
    blocks holding video queries sum to 1, text keys get none (text blocks are always kept).
    ``starts``: ``(q_starts, kv_starts)`` variable block boundaries (cluster-aligned blocks).

    Example::

        >>> layout = TokenLayout((2, 8, 8))
        >>> clustering = cluster_heads(torch.randn(1, 128, 1, 16), torch.randn(1, 128, 1, 16), layout, 4, 8)
        >>> semantic_block_mass(clustering, layout, (32, 32)).sum(-1).round(decimals=4)
        tensor([[[1., 1., 1., 1.]]])
    """
    scale = clustering.q_centroids.shape[-1] ** -0.5 if scale is None else scale
    k_sizes = _cluster_sizes(clustering.k_labels, clustering.k_centroids.shape[-2])
    logits = scale * clustering.q_centroids @ clustering.k_centroids.transpose(-1, -2) + k_sizes.log()[..., None, :]
    per_key = logits.softmax(-1) / k_sizes.clamp(min=1)[..., None, :]
    q_starts, kv_starts = (None, None) if starts is None else starts
    q_share = _block_cluster_counts(clustering.q_labels, clustering.q_centroids.shape[-2], layout, block_size[0], q_starts)
    q_share = q_share / q_share.sum(-1, keepdim=True).clamp(min=1)
    k_count = _block_cluster_counts(clustering.k_labels, clustering.k_centroids.shape[-2], layout, block_size[1], kv_starts)
    return q_share @ per_key @ k_count.transpose(-1, -2)


def semantic_block_mask(
    clustering: SemanticClustering,
    layout: TokenLayout,
    block_size: tuple[int, int],
    budget: Budget,
    scale: float | None = None,
    starts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Boolean ``[B, H, nQ, nK]`` over the orders of :meth:`SemanticClustering.orders`: each query
    block's heaviest key blocks of the centroid estimate under ``budget`` (text blocks on top).
    With ``starts`` (:meth:`SemanticClustering.block_starts`), over cluster-aligned blocks, the
    budget counted in keys.

    Example::

        >>> layout = TokenLayout((4, 16, 16))
        >>> q, k = torch.randn(1, 1024, 2, 32), torch.randn(1, 1024, 2, 32)
        >>> mask = semantic_block_mask(cluster_heads(q, k, layout), layout, (64, 64), Budget(density=0.25))
        >>> mask.sum(-1).unique().tolist()
        [4]
    """
    return semantic_block_masks(clustering, layout, block_size, [budget], scale, starts)[0]


def semantic_block_masks(
    clustering: SemanticClustering,
    layout: TokenLayout,
    block_size: tuple[int, int],
    budgets: list[Budget],
    scale: float | None = None,
    starts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """:func:`semantic_block_mask` at each of ``budgets``, from one centroid estimate.

    Example::

        >>> layout = TokenLayout((4, 16, 16))
        >>> clustering = cluster_heads(torch.randn(1, 1024, 2, 32), torch.randn(1, 1024, 2, 32), layout)
        >>> [m.sum(-1).unique().tolist() for m in semantic_block_masks(clustering, layout, (64, 64), [Budget(density=0.25), Budget(density=0.5)])]
        [[4], [8]]
    """
    mass = semantic_block_mass(clustering, layout, block_size, scale, starts)
    if starts is None:
        return [adaptive_block_mask(mass, layout, block_size, budget) for budget in budgets]
    bounds = [s.to(mass.device) for s in starts]
    sizes = [b[..., 1:] - b[..., :-1] for b in bounds]
    text = [b[..., 1:] > b[..., :-1].clamp(min=layout.video_len) for b in bounds]
    return [keep_heaviest_keys(mass, sizes[1], budget, layout.seq_len, layout.video_len, text[1]) | text[0][..., :, None]
            for budget in budgets]


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


def _block_cluster_counts(
    labels: torch.Tensor, num_clusters: int, layout: TokenLayout, block: int, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, H, nBlocks, C]`` tokens of each cluster in each block of the cluster order (fixed
    blocks, or those ``starts`` bounds)."""
    sorted_labels = labels.sort(-1).values
    positions = torch.arange(labels.shape[-1], device=labels.device)
    if starts is None:
        blocks, n_blocks = positions // block, layout.num_blocks(block)
    else:
        starts = starts.to(labels.device).expand(*labels.shape[:-1], -1).contiguous()
        blocks = torch.searchsorted(starts[..., 1:].contiguous(), positions.expand_as(labels).contiguous(), right=True)
        n_blocks = starts.shape[-1] - 1
    index = blocks * num_clusters + sorted_labels
    counts = torch.zeros(*labels.shape[:-1], n_blocks * num_clusters, device=labels.device)
    counts.scatter_add_(-1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts.view(*labels.shape[:-1], n_blocks, num_clusters)
