import math

import pytest
import torch

from dit_sparse import BlockSparsePlan, TokenLayout
from dit_sparse.budget import Budget
from dit_sparse.families import cluster_heads, semantic_block_mask, semantic_block_mass, semantic_block_masks
from dit_sparse.families.semantic import SemanticClustering, split_key_clusters
from dit_sparse.kmeans import kmeans


def blobs(groups: int, per_blob: int, centres: torch.Tensor, spread: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    points = centres.repeat_interleave(per_blob, 0)
    return (points + spread * torch.randn(groups, *points.shape, generator=g))[:, torch.randperm(len(points), generator=g)]


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    centres = torch.tensor([[0.0, 0.0, 8.0], [8.0, 0.0, 0.0], [0.0, 8.0, 0.0], [-8.0, -8.0, -8.0]])
    x = blobs(3, 40, centres)
    labels, found = kmeans(x, 4, iters=10, seed=1)
    for g in range(3):
        assert sorted(labels[g].bincount().tolist()) == [40, 40, 40, 40]
        nearest = torch.cdist(found[g], centres).min(-1).values
        assert (nearest < 0.3).all()
    again, _ = kmeans(x, 4, iters=10, seed=1)
    assert torch.equal(labels, again)


def test_kmeans_warm_start_stays_converged():
    x = blobs(2, 30, torch.tensor([[5.0, 5.0], [-5.0, 5.0], [0.0, -5.0]]))
    labels, centroids = kmeans(x, 3, iters=20, seed=0)
    warm_labels, warm = kmeans(x, 3, iters=1, init=centroids)
    assert torch.equal(warm_labels, labels) and torch.allclose(warm, centroids)
    with pytest.raises(ValueError, match="init must be"):
        kmeans(x, 3, iters=1, init=centroids[:, :2])
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 100, iters=1)


def test_split_separates_the_two_blobs_of_a_cluster_and_keeps_keys_in_their_cluster():
    layout = TokenLayout((1, 10, 12), text_len=4)
    n = layout.video_len
    g = torch.Generator().manual_seed(0)
    # two key clusters: 0 holds two blobs (interleaved in raster order), 1 one blob
    blob = torch.randint(0, 2, (n,), generator=g)
    parent = torch.where(torch.arange(n) < 90, 0, 1)
    centres = torch.tensor([[6.0, 0.0, 0.0, 0.0], [-6.0, 0.0, 0.0, 0.0], [0.0, 0.0, 9.0, 0.0]])
    video = centres[torch.where(parent == 0, blob, 2)] + 0.3 * torch.randn(n, 4, generator=g)
    k = torch.cat([video, torch.randn(layout.text_len, 4, generator=g)])[None, :, None]      # (1, S, 1, 4)
    means = torch.stack([video[parent == c].mean(0) for c in (0, 1)])[None, None]
    coarse = SemanticClustering(torch.zeros(1, 1, n, dtype=torch.long), parent[None, None], means[:, :, :1], means)
    fine = split_key_clusters(coarse, k, layout, iters=3)
    assert torch.equal(fine.k_labels // 2, coarse.k_labels) and fine.k_centroids.shape == (1, 1, 4, 4)
    in_first = fine.k_labels[0, 0, parent == 0]
    assert torch.equal(in_first, blob[parent == 0]) or torch.equal(in_first, 1 - blob[parent == 0])
    # every key is at least as near its own half's mean as its sibling's (brute force)
    distance = torch.cdist(video, fine.k_centroids[0, 0])
    own, sibling = fine.k_labels[0, 0], fine.k_labels[0, 0] ^ 1
    assert (distance.gather(1, own[:, None]) <= distance.gather(1, sibling[:, None]) + 1e-5).all()
    # the query clustering is untouched, the key order keeps each coarse cluster contiguous
    assert fine.q_labels is coarse.q_labels
    assert torch.equal(coarse.k_labels[0, 0, fine.orders(layout)[1][0, 0, :n]].diff().clamp(max=0), torch.zeros(n - 1, dtype=torch.long))


def test_masks_at_several_budgets_come_from_one_estimate():
    layout = TokenLayout((4, 16, 16), text_len=7)
    clustering = cluster_heads(torch.randn(1, layout.seq_len, 2, 16), torch.randn(1, layout.seq_len, 2, 16), layout)
    budgets = [Budget(density=0.1), Budget(density=0.3)]
    for starts in (None, clustering.block_starts(layout, (64, 64))):
        masks = semantic_block_masks(clustering, layout, (64, 64), budgets, starts=starts)
        assert all(torch.equal(m, semantic_block_mask(clustering, layout, (64, 64), b, starts=starts)) for m, b in zip(masks, budgets))


@pytest.mark.parametrize("text_first", [False, True])
def test_orders_sort_video_by_cluster_and_keep_text_last(text_first):
    layout = TokenLayout((2, 4, 6), text_len=5, text_first=text_first)
    q, k = torch.randn(2, layout.seq_len, 3, 8), torch.randn(2, layout.seq_len, 3, 8)
    clustering = cluster_heads(q, k, layout, query_clusters=3, key_clusters=5, iters=3)
    q_order, kv_order = clustering.orders(layout)
    text = torch.arange(layout.text_offset, layout.text_offset + 5)
    for order, labels in ((q_order, clustering.q_labels), (kv_order, clustering.k_labels)):
        assert (order[..., layout.video_len :] == text).all()
        video = order[..., : layout.video_len] - layout.video_offset
        assert (labels.gather(-1, video).diff(dim=-1) >= 0).all()
    plan = BlockSparsePlan.from_block_mask(
        torch.ones(2, 3, layout.num_blocks(8), layout.num_blocks(8), dtype=torch.bool), layout, 8, q_order, kv_order
    )
    assert plan.batch_size == 2


def estimate_by_loops(clustering, layout, block_size, b, h):
    """Token-level centroid estimate pooled to blocks: a query of cluster a gives a key of cluster c
    softmax_c(q_a . k_c / sqrt(d) + log |c|) / |c|; a block row averages its video queries."""
    qc, kc = clustering.q_centroids[b, h].double(), clustering.k_centroids[b, h].double()
    q_labels, k_labels = clustering.q_labels[b, h].tolist(), clustering.k_labels[b, h].tolist()
    sizes = [k_labels.count(c) for c in range(len(kc))]
    scores = []
    for a in range(len(qc)):
        logits = [float(qc[a] @ kc[c]) / math.sqrt(qc.shape[1]) + math.log(s) if s else -math.inf for c, s in enumerate(sizes)]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        scores.append([w / sum(weights) / s if s else 0.0 for w, s in zip(weights, sizes)])
    q_sorted = sorted(q_labels)
    k_sorted = sorted(k_labels)
    bq, bk = block_size
    out = torch.zeros(layout.num_blocks(bq), layout.num_blocks(bk), dtype=torch.float64)
    for i in range(out.shape[0]):
        queries = q_sorted[i * bq : (i + 1) * bq]
        for j in range(out.shape[1]):
            keys = k_sorted[j * bk : (j + 1) * bk]
            if queries:
                out[i, j] = sum(scores[a][c] for a in queries for c in keys) / len(queries)
    return out


def test_centroid_estimate_and_mask_match_token_level_loops():
    layout, blocks = TokenLayout((2, 6, 5), text_len=4), (16, 8)
    q, k = torch.randn(1, layout.seq_len, 2, 8), torch.randn(1, layout.seq_len, 2, 8)
    clustering = cluster_heads(q, k, layout, query_clusters=4, key_clusters=6, iters=5)
    mass = semantic_block_mass(clustering, layout, blocks)
    mask = semantic_block_mask(clustering, layout, blocks, Budget(density=0.3))
    n_video_k = layout.num_video_blocks(8)
    keep = round(0.3 * n_video_k)
    for h in range(2):
        expected = estimate_by_loops(clustering, layout, blocks, 0, h)
        assert torch.allclose(mass[0, h].double(), expected, atol=1e-6)
        for i in range(layout.num_video_blocks(16)):
            ranked = sorted(range(n_video_k), key=lambda j: -float(expected[i, j]))
            assert set(mask[0, h, i].nonzero().flatten().tolist()) == set(ranked[:keep]) | set(range(n_video_k, mask.shape[-1]))


def test_cluster_counts_scale_with_the_video_and_reject_too_many():
    layout = TokenLayout((4, 16, 16))
    x = torch.randn(1, layout.seq_len, 1, 8)
    clustering = cluster_heads(x, x, layout, iters=1)
    assert clustering.q_centroids.shape[2] == 4 and clustering.k_centroids.shape[2] == 16
    with pytest.raises(ValueError, match="key_clusters=2000 exceeds the 1024 video tokens"):
        cluster_heads(x, x, layout, key_clusters=2000)


def test_cluster_blocks_hold_one_cluster_each_and_the_mask_keeps_whole_clusters():
    """Cluster-aligned blocks: no block holds two clusters, none exceeds the block size, every head
    has the same block count; the mask over them spends at most the budget's keys per query block
    and attention over the plan is exact on every backend here."""
    from dit_sparse import sparse_attention
    from dit_sparse.families.semantic import cluster_block_starts

    layout = TokenLayout((3, 8, 12), text_len=9)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16, generator=g) for _ in range(3))
    clustering = cluster_heads(q, k, layout, query_clusters=5, key_clusters=11)
    starts = clustering.block_starts(layout, (32, 16))
    assert starts[1].shape == (1, 2, -(-layout.video_len // 16) + 11 + 1 + 1)
    for labels, bounds, size in ((clustering.q_labels, starts[0], 32), (clustering.k_labels, starts[1], 16)):
        sizes = bounds[..., 1:] - bounds[..., :-1]
        assert ((sizes >= 0) & (sizes <= size)).all() and (bounds[..., -1] == layout.seq_len).all()
        sorted_labels = labels.sort(-1).values
        for h in range(2):
            for a, b in zip(bounds[0, h, :-1].tolist(), bounds[0, h, 1:].tolist()):
                if a < b <= layout.video_len:
                    assert len(set(sorted_labels[0, h, a:b].tolist())) == 1
    with pytest.raises(ValueError, match="steps of 0 to the block size"):
        BlockSparsePlan.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), layout, 16,
                                        q_starts=torch.tensor([0, layout.seq_len]))
    assert torch.equal(cluster_block_starts(clustering.k_labels, 11, layout, 16), starts[1])

    budget = Budget(density=0.2)
    mask = semantic_block_mask(clustering, layout, (32, 16), budget, starts=starts)
    key_sizes = starts[1][..., 1:] - starts[1][..., :-1]
    text_k = starts[1][..., 1:] > starts[1][..., :-1].clamp(min=layout.video_len)
    video_q = (starts[0][..., 1:] <= layout.video_len) & (starts[0][..., 1:] > starts[0][..., :-1])
    kept_video = ((mask & ~text_k[..., None, :]) * key_sizes[..., None, :]).sum(-1)
    assert (mask | ~text_k[..., None, :]).all()
    assert (kept_video[video_q] <= round(0.2 * layout.video_len)).all()
    assert (kept_video[video_q] > 0).all()
    q_order, kv_order = clustering.orders(layout)
    plan = BlockSparsePlan.from_block_mask(mask, layout, (32, 16), q_order=q_order, kv_order=kv_order,
                                           q_starts=starts[0], kv_starts=starts[1])
    reference = sparse_attention(q, k, v, plan, backend="torch_reference")
    for backend in ("torch", "flex"):
        torch.testing.assert_close(sparse_attention(q, k, v, plan, backend=backend), reference, atol=1e-5, rtol=1e-5)
