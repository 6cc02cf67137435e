import pytest
import torch

from dit_sparse import BlockSparsePlan, TokenLayout
from random_plans import random_plan


def token_mask_by_loops(plan: BlockSparsePlan, batch: int) -> torch.Tensor:
    """Token mask from the definition: query i at permuted position p attends key j at position p'
    iff block (p // bq, p' // bk) is kept and j is not text padding."""
    s, heads = plan.layout.seq_len, plan.num_heads
    blocks = plan.to_block_mask()
    valid = plan.layout.key_valid_len(batch)
    out = torch.zeros(batch, heads, s, s, dtype=torch.bool)
    for b in range(batch):
        pb = b if plan.batch_size > 1 else 0
        for h in range(heads):
            qo, ko = plan.order("q", batch)[b, h], plan.order("kv", batch)[b, h]
            for p in range(s):
                for pk in range(s):
                    if blocks[pb, h, p // plan.block_size_q, pk // plan.block_size_k] and (valid is None or pk < valid[b]):
                        out[b, h, qo[p], ko[pk]] = True
    return out


@pytest.mark.parametrize("text_first", [False, True])
def test_token_mask_matches_definition(text_first):
    layout = TokenLayout((2, 3, 5), text_len=7, text_first=text_first, valid_text_len=(7, 2))
    plan = random_plan(layout, heads=2, block_size=8, batch=2, empty_rows=1, seed=3)
    assert torch.equal(plan.to_token_mask(), token_mask_by_loops(plan, 2))


def test_text_rows_and_columns_are_forced_on():
    layout = TokenLayout((2, 4, 4), text_len=20)  # 32 video tokens: blocks of 16 -> 2 video, 2 text (one mixed)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    plan = BlockSparsePlan.from_block_mask(mask, layout, 16)
    blocks = plan.to_block_mask()[0, 0]
    assert blocks[2:].all() and blocks[:, 2:].all() and not blocks[:2, :2].any()


def test_block_mask_round_trip_and_rows_sorted():
    layout = TokenLayout((3, 7, 9))
    mask = torch.rand(2, 3, layout.num_blocks(32), layout.num_blocks(32)) < 0.4
    plan = BlockSparsePlan.from_block_mask(mask, layout, 32)
    assert torch.equal(plan.to_block_mask(), mask)
    assert plan.kv_counts.tolist() == mask.sum(-1).tolist()


def test_density_counts_true_block_sizes():
    layout = TokenLayout((1, 10, 10), text_len=5)  # 105 tokens, blocks of 32: sizes 32, 32, 32, 9
    plan = random_plan(layout, heads=3, block_size=32, density=0.4, seed=1)
    token = plan.to_token_mask()
    per_head = token.float().mean((-1, -2))
    assert torch.allclose(plan.density(per_head=True).float(), per_head, atol=1e-6)
    assert plan.density() == pytest.approx(float(per_head.mean()), abs=1e-6)


def test_full_plan_has_density_one():
    layout = TokenLayout((3, 5, 7), text_len=3)
    n = layout.num_blocks(16)
    plan = BlockSparsePlan.from_block_mask(torch.ones(2, n, n, dtype=torch.bool), layout, 16)
    assert plan.density() == pytest.approx(1.0)


def test_flex_block_mask_marks_the_same_blocks():
    layout = TokenLayout((2, 5, 7), text_len=9, valid_text_len=(9, 4))
    plan = random_plan(layout, heads=2, block_size=16, batch=2, seed=4)
    bm = plan.to_flex_block_mask()
    dense = bm.to_dense().bool()
    assert torch.equal(dense[..., : plan.num_q_blocks, : plan.num_kv_blocks], plan.to_block_mask())


def test_flex_attention_with_plan_mask_matches_reference():
    from torch.nn.attention.flex_attention import flex_attention
    from dit_sparse import sparse_attention

    layout = TokenLayout((2, 4, 8), text_len=6, valid_text_len=(6, 2))
    plan = random_plan(layout, heads=2, block_size=16, batch=2, orders=False, seed=5)
    q, k, v = (torch.randn(2, layout.seq_len, 2, 16) for _ in range(3))
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    out = flex_attention(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=plan.to_flex_block_mask())
    live = plan.to_token_mask().any(-1).transpose(1, 2)[..., None]
    torch.testing.assert_close(out.transpose(1, 2) * live, ref, atol=1e-5, rtol=1e-5)


def test_concat_batch_and_tensors_round_trip():
    layout = TokenLayout((2, 4, 4), text_len=5)
    a = random_plan(layout, heads=2, block_size=16, seed=1)
    b = random_plan(layout, heads=2, block_size=16, orders=False, seed=2)
    both = BlockSparsePlan.concat_batch([a, b])
    assert both.batch_size == 2
    assert torch.equal(both.to_token_mask(), torch.cat([a.to_token_mask(), b.to_token_mask()]))
    again = BlockSparsePlan.from_tensors(both.tensors(), layout, 16)
    assert torch.equal(again.to_token_mask(), both.to_token_mask())


def test_plans_with_variable_blocks_join_slice_and_count_like_their_token_masks():
    """Variable blocks through concat_batch, concat_heads (with a fixed-block plan: it gets empty
    blocks appended), select_heads, tensors and density."""
    from random_plans import random_starts

    layout = TokenLayout((2, 4, 5), text_len=6, valid_text_len=(4,))
    g = torch.Generator().manual_seed(3)
    starts = (random_starts(layout, 16, 2, 1, g), random_starts(layout, 16, 2, 1, g))
    mask = torch.rand(1, 2, starts[0].shape[-1] - 1, starts[1].shape[-1] - 1, generator=g) < 0.4
    variable = BlockSparsePlan.from_block_mask(mask, layout, 16, q_starts=starts[0], kv_starts=starts[1])
    fixed = random_plan(layout, heads=2, block_size=16, seed=2)
    tokens = variable.to_token_mask()
    assert variable.variable_blocks and not fixed.variable_blocks
    assert torch.allclose(variable.density(per_head=True).float(), variable.with_layout(TokenLayout((2, 4, 5), 6)).to_token_mask().float().mean((-1, -2)))
    for joined, expected in (
        (BlockSparsePlan.concat_batch([variable, fixed]), torch.cat([tokens, fixed.to_token_mask()])),
        (BlockSparsePlan.concat_heads([fixed, variable]), torch.cat([fixed.to_token_mask(), tokens], 1)),
        (variable.select_heads([1]), tokens[:, 1:]),
        (BlockSparsePlan.from_tensors(variable.tensors(), layout, 16), tokens),
    ):
        assert joined.variable_blocks and torch.equal(joined.to_token_mask(), expected)


def test_with_layout_changes_padding_only():
    layout = TokenLayout((2, 4, 4), text_len=5)
    plan = random_plan(layout, heads=2, block_size=16, seed=1)
    padded = plan.with_layout(layout.with_valid_text_len((2,)))
    assert not padded.to_token_mask()[..., layout.video_len + 2 :].any()
    with pytest.raises(ValueError, match="cannot serve"):
        plan.with_layout(TokenLayout((2, 4, 8), text_len=5))


def _counts_indices(plan):
    return plan.kv_counts.clone(), plan.kv_indices.clone()


@pytest.fixture
def small():
    layout = TokenLayout((2, 4, 4))
    return layout, random_plan(layout, heads=2, block_size=8, orders=False, seed=0)


def test_wrong_mask_shape_or_dtype(small):
    layout, _ = small
    with pytest.raises(ValueError, match=r"nQ = 4, nK = 4"):
        BlockSparsePlan.from_block_mask(torch.ones(2, 3, 4, dtype=torch.bool), layout, 8)
    with pytest.raises(TypeError, match="bool"):
        BlockSparsePlan.from_block_mask(torch.ones(2, 4, 4), layout, 8)
    with pytest.raises(ValueError, match="block sizes must be positive"):
        BlockSparsePlan.from_block_mask(torch.ones(2, 4, 4, dtype=torch.bool), layout, 0)


def test_out_of_range_unsorted_and_miscounted_indices(small):
    layout, plan = small
    counts, idx = _counts_indices(plan)
    bad = idx.clone(); bad[0] = 4
    with pytest.raises(ValueError, match="out of range"):
        BlockSparsePlan(layout, 8, counts, bad)
    with pytest.raises(ValueError, match="sum to"):
        BlockSparsePlan(layout, 8, counts, idx[:-1])
    row = int(torch.nonzero(counts.reshape(-1) >= 2)[0])
    start = int(plan.kv_offsets.reshape(-1)[row])
    swapped = idx.clone(); swapped[start], swapped[start + 1] = idx[start + 1], idx[start]
    with pytest.raises(ValueError, match="strictly increasing"):
        BlockSparsePlan(layout, 8, counts, swapped)
    with pytest.raises(ValueError, match="kv_counts must be"):
        BlockSparsePlan(layout, 8, counts[..., :-1], idx)


def test_orders_must_be_permutations_with_text_last():
    layout = TokenLayout((2, 4, 4), text_len=3, text_first=True)
    mask = torch.ones(1, 5, 5, dtype=torch.bool)
    bad = layout.identity_order().clone(); bad[0] = bad[1]
    with pytest.raises(ValueError, match="not a permutation"):
        BlockSparsePlan.from_block_mask(mask, layout, 8, q_order=bad)
    text_front = torch.arange(layout.seq_len)
    with pytest.raises(ValueError, match="end with the text"):
        BlockSparsePlan.from_block_mask(mask, layout, 8, kv_order=text_front)
    with pytest.raises(ValueError, match="S = 35"):
        BlockSparsePlan.from_block_mask(mask, layout, 8, q_order=torch.arange(34))
    with pytest.raises(ValueError, match="heads"):
        BlockSparsePlan.from_block_mask(mask, layout, 8, q_order=layout.identity_order().expand(2, 2, -1))


def test_text_rules_are_enforced_on_direct_construction():
    layout = TokenLayout((2, 4, 4), text_len=8)  # blocks of 8: 4 video, 1 text
    counts = torch.full((1, 1, 5), 5, dtype=torch.int32)
    idx = torch.arange(5).repeat(5)
    BlockSparsePlan(layout, 8, counts, idx)
    counts_missing_text = counts.clone(); counts_missing_text[0, 0, 0] = 4
    with pytest.raises(ValueError, match="text key blocks"):
        BlockSparsePlan(layout, 8, counts_missing_text, torch.cat([torch.arange(4), torch.arange(5).repeat(4)]))
    short_text_row = counts.clone(); short_text_row[0, 0, 4] = 1
    with pytest.raises(ValueError, match="text query blocks"):
        BlockSparsePlan(layout, 8, short_text_row, torch.cat([torch.arange(5).repeat(4), torch.tensor([4])]))


def test_batch_mismatch_between_mask_and_orders():
    layout = TokenLayout((2, 4, 4))
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="batch size"):
        BlockSparsePlan.from_block_mask(mask, layout, 8, q_order=layout.identity_order().expand(3, 1, -1))


def test_token_mask_refuses_large_sequences():
    layout = TokenLayout((16, 64, 64))
    plan = BlockSparsePlan.from_block_mask(torch.ones(1, 1, 1, dtype=torch.bool).expand(1, 1024, 1024), layout, 64)
    with pytest.raises(ValueError, match="small test sequences"):
        plan.to_token_mask()
