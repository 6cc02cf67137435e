import pytest
import torch
import torch.nn.functional as F

from dit_sparse import output_error

from dit_sparse import BlockSparsePlan, TokenLayout, sparse_attention
from dit_sparse.output_error import Candidate, RowSample, estimate_errors, estimate_errors_and_recall, sample_rows


def test_sample_rows_draws_one_video_row_per_stratum():
    layout = TokenLayout((3, 8, 10), text_len=12, text_first=True)
    rows = sample_rows(layout, 24, seed=3)
    assert rows.shape == (24,) and (rows == sample_rows(layout, 24, seed=3)).all()
    strata = (rows - layout.video_offset) // (layout.video_len // 24)
    assert strata.tolist() == list(range(24))
    assert (sample_rows(layout, 10_000) == torch.arange(12, layout.seq_len)).all()   # every video row


def _masked_attention_rows(q, k, v, plan, rows):
    """Dense SDPA under the plan's token mask (the reference), at the given query rows."""
    out = sparse_attention(q, k, v, plan, backend="torch_reference")
    return out[:, rows]


@pytest.mark.parametrize("head_group", ["all heads at once", "one head at a time"])
def test_estimate_matches_masked_dense_attention_on_the_sampled_rows(head_group, monkeypatch):
    if head_group == "one head at a time":   # the memory bound lets one head's buffers through at a time
        monkeypatch.setattr(output_error, "_CHUNK_ELEMENTS", 1)
    layout = TokenLayout((2, 6, 8), text_len=9, valid_text_len=(5, 9))   # padded text, two prompts
    batch, heads, dim, blocks = 2, 3, 8, (16, 16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, layout.seq_len, heads, dim, generator=g) * 2 for _ in range(3))
    n = layout.num_blocks(16)
    permuted = torch.stack([torch.randperm(layout.video_len, generator=g) for _ in range(heads)])
    order = torch.cat([permuted, torch.arange(layout.video_len, layout.seq_len).expand(heads, -1)], -1)
    masks = [torch.rand(batch, heads, n, n, generator=g) < p for p in (0.3, 0.6)]
    sample = RowSample.of(q, k, v, layout, count=20, seed=1)
    orders = {"tile": (layout.identity_order(), layout.identity_order()), "shuffled": (order, order)}
    candidates = [Candidate(masks[0], "tile"), Candidate(masks[1], "shuffled"), Candidate(masks[0], "shuffled")]
    errors, recall = estimate_errors_and_recall(sample, blocks, orders, candidates, plan_batch=batch)
    assert torch.equal(errors, estimate_errors(sample, blocks, orders, candidates, plan_batch=batch))

    scores = torch.einsum("brhd,bshd->bhrs", q[:, sample.rows], k) * dim**-0.5
    weights = scores.masked_fill(layout.key_padding(batch)[:, None, None, :], float("-inf")).softmax(-1)
    dense = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)),
        attn_mask=BlockSparsePlan.from_block_mask(torch.ones(n, n, dtype=torch.bool).expand(heads, n, n), layout, 16)
        .to_token_mask(batch),
    ).transpose(1, 2)[:, sample.rows]
    for c, candidate in enumerate(candidates):
        q_order, kv_order = orders[candidate.orders]
        plan = BlockSparsePlan.from_block_mask(candidate.mask, layout, blocks, q_order=q_order, kv_order=kv_order)
        sparse = _masked_attention_rows(q, k, v, plan, sample.rows)
        expected = ((sparse - dense).pow(2).sum((1, 3)) / dense.pow(2).sum((1, 3))).sqrt()
        assert torch.allclose(errors[c], expected, atol=1e-4), (c, errors[c], expected)
        kept = plan.to_token_mask(batch)[:, :, sample.rows]                                  # [B, H, R, S]
        assert torch.allclose(recall[c], (weights * kept).sum(-1).mean(-1), atol=1e-5), c


def test_shared_masks_pool_the_rows_of_every_batch_element():
    layout = TokenLayout((2, 8, 8))
    q, k, v = (torch.randn(2, layout.seq_len, 1, 8) for _ in range(3))
    sample = RowSample.of(q, k, v, layout, count=16, seed=0)
    order = torch.arange(layout.seq_len)
    diagonal = Candidate(torch.eye(4, dtype=torch.bool).expand(1, 1, 4, 4), "raster")
    per_element = estimate_errors(sample, (32, 32), {"raster": (order, order)}, [diagonal], plan_batch=2)
    pooled = estimate_errors(sample, (32, 32), {"raster": (order, order)}, [diagonal], plan_batch=1)
    assert pooled.shape == (1, 1, 1)
    assert per_element.min() <= pooled.min() <= per_element.max()


def test_estimate_over_variable_blocks_matches_masked_dense_attention():
    """Masks over variable (cluster-aligned style) blocks, empty blocks included, text last."""
    from random_plans import random_orders, random_starts

    layout = TokenLayout((2, 5, 9), text_len=7)
    batch, heads, dim, blocks = 1, 2, 8, (16, 32)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(batch, layout.seq_len, heads, dim, generator=g) * 2 for _ in range(3))
    q_order, kv_order = random_orders(layout, heads, 1, g), random_orders(layout, heads, 1, g)
    starts = (random_starts(layout, 16, heads, 1, g), random_starts(layout, 32, heads, 1, g))
    mask = torch.rand(1, heads, starts[0].shape[-1] - 1, starts[1].shape[-1] - 1, generator=g) < 0.4
    sample = RowSample.of(q, k, v, layout, count=30, seed=0)
    error, recall = (x[0] for x in estimate_errors_and_recall(
        sample, blocks, {"clusters": (q_order, kv_order)}, [Candidate(mask, "clusters")], 1, starts={"clusters": starts}
    ))
    plan = BlockSparsePlan.from_block_mask(mask, layout, blocks, q_order=q_order, kv_order=kv_order,
                                           q_starts=starts[0], kv_starts=starts[1])
    full = BlockSparsePlan.from_block_mask(torch.ones(heads, 1, 1, dtype=torch.bool), layout, 1024)
    dense = _masked_attention_rows(q, k, v, full, sample.rows)
    sparse = _masked_attention_rows(q, k, v, plan, sample.rows)
    expected = ((sparse - dense).pow(2).sum((1, 3)) / dense.pow(2).sum((1, 3))).sqrt()
    assert torch.allclose(error, expected, atol=1e-4)
    weights = (torch.einsum("brhd,bshd->bhrs", q[:, sample.rows], k) * dim**-0.5).softmax(-1)
    assert torch.allclose(recall, (weights * plan.to_token_mask(1)[:, :, sample.rows]).sum(-1).mean(-1), atol=1e-5)
