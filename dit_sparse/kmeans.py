"""Batched k-means on the tensor's device: many small clusterings (one per head) at once."""

from __future__ import annotations

import torch

from .kernels.block_mass_torch import chunk_scores

SEEDING_POINTS_PER_CLUSTER = 8


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    iters: int,
    seed: int = 0,
    init: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    total_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means (Euclidean) over each group of points.

    Args:
        x: ``[G, N, D]`` points, G independent groups (e.g. batch x heads).
        num_clusters: clusters per group (at most N).
        iters: Lloyd iterations (assign, then move each centroid to its points' mean).
        seed: seeds the k-means++ choice of initial centroids when ``init`` is None (made on a
            random subsample of ``SEEDING_POINTS_PER_CLUSTER`` points per cluster).
        init: ``[G, C, D]`` centroids to start from (warm start from an earlier clustering).
        rows, total_rows: the groups are rows ``rows`` (``[G]``) of a call with ``total_rows`` groups
            (e.g. one rank's heads under context parallelism): each group is seeded, and the points
            are chunked, exactly as in that call. Default: the groups are the whole call.

    Returns ``labels [G, N]`` (int64) and ``centroids [G, C, D]`` (fp32); labels are the final
    assignment to the returned centroids. A cluster that loses all its points keeps its centroid.
    Deterministic for a seed on a given device (no atomic sums).

    Example::

        >>> x = torch.cat([torch.randn(1, 50, 2) - 5, torch.randn(1, 50, 2) + 5], dim=1)
        >>> labels, centroids = kmeans(x, 2, iters=5)
        >>> sorted(labels[0].bincount().tolist())
        [50, 50]
    """
    groups, points, dim = x.shape
    if not 1 <= num_clusters <= points:
        raise ValueError(f"kmeans needs 1 <= num_clusters <= {points} points, got {num_clusters}")
    x = x.float()
    if rows is None:
        rows, total_rows = torch.arange(groups), groups
    if init is None:
        centroids = _kmeans_plus_plus(x, num_clusters, torch.Generator().manual_seed(seed), rows.cpu(), total_rows)
    else:
        if init.shape != (groups, num_clusters, dim):
            raise ValueError(f"init must be [G, C, D] = {(groups, num_clusters, dim)}, got {tuple(init.shape)}")
        centroids = init.float().to(x.device)
    for _ in range(iters):
        centroids = cluster_means(x, _assign(x, centroids, total_rows), centroids, total_rows)
    return _assign(x, centroids, total_rows), centroids


def _kmeans_plus_plus(
    x: torch.Tensor, num_clusters: int, generator: torch.Generator, rows: torch.Tensor, total_rows: int
) -> torch.Tensor:
    """k-means++ seeding on a random subsample: each next centroid is a point drawn with probability
    proportional to its squared distance from the centroids so far. Draws come from a CPU
    generator, so the seeding is the same on every device; group ``g`` takes row ``rows[g]`` of
    draws made for ``total_rows`` groups."""
    groups, points, dim = x.shape
    size = min(points, SEEDING_POINTS_PER_CLUSTER * num_clusters)
    sample = torch.rand(total_rows, points, generator=generator)[rows].argsort(-1)[:, :size].to(x.device)
    pool = x.gather(1, sample[..., None].expand(-1, -1, dim))
    draws = torch.rand(total_rows, num_clusters, generator=generator)[rows].to(x.device)
    rows = torch.arange(groups, device=x.device)
    centroids = torch.empty(groups, num_clusters, dim, device=x.device)
    centroids[:, 0] = pool[:, 0]
    nearest = ((pool - centroids[:, :1]) ** 2).sum(-1)
    for c in range(1, num_clusters):
        cdf = nearest.cumsum(-1)
        pick = torch.searchsorted(cdf, (draws[:, c] * cdf[:, -1])[:, None]).clamp(max=size - 1)[:, 0]
        centroids[:, c] = pool[rows, pick]
        nearest = torch.minimum(nearest, ((pool - centroids[:, c, None]) ** 2).sum(-1))
    return centroids


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk_groups: int) -> torch.Tensor:
    """Nearest centroid of every point, in chunks of points (sized for ``chunk_groups`` groups) so the
    score matrix stays small."""
    half_norm = 0.5 * (centroids * centroids).sum(-1)
    labels = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
    step = max(1, chunk_scores(x.device) // (chunk_groups * centroids.shape[1]))
    for first in range(0, x.shape[1], step):
        scores = torch.baddbmm(-half_norm[:, None, :], x[:, first : first + step], centroids.transpose(1, 2))
        labels[:, first : first + step] = scores.argmax(-1)
    return labels


def cluster_means(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, chunk_groups: int | None = None) -> torch.Tensor:
    """Mean of each cluster's points; empty clusters stay put. Sums do not depend on thread timing
    or on the other groups: on CPU an ``index_add_`` adds each cluster's points in their order; on
    other devices (whose scatter adds are atomic) they are products with a one-hot assignment, over
    chunks of points sized for ``chunk_groups`` groups, so they add in the same order whichever
    share of those groups is clustered."""
    groups, num_clusters, dim = centroids.shape
    chunk_groups = groups if chunk_groups is None else chunk_groups
    rows = (labels + torch.arange(groups, device=x.device)[:, None] * num_clusters).flatten()
    counts = torch.zeros(groups * num_clusters, device=x.device).index_add_(0, rows, torch.ones_like(rows, dtype=x.dtype))
    counts = counts.view(groups, num_clusters, 1)
    if x.device.type == "cpu":
        sums = torch.zeros(groups * num_clusters, dim).index_add_(0, rows, x.reshape(-1, dim)).view_as(centroids)
    else:
        sums = torch.zeros_like(centroids)
        step = max(1, chunk_scores(x.device) // (chunk_groups * num_clusters))
        for first in range(0, x.shape[1], step):
            chunk = labels[:, first : first + step, None]
            one_hot = torch.zeros(groups, chunk.shape[1], num_clusters, device=x.device).scatter_(2, chunk, 1.0)
            sums.baddbmm_(one_hot.transpose(1, 2), x[:, first : first + step])
    return torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
