"""``backend="flex"`` on the CPU: eager FlexAttention for small inputs, compiled FlexAttention once
eager would hold more scores than ``FLEX_EAGER_SCORE_BYTES``, and a clear refusal when it cannot be
compiled."""

import pytest
import torch

import dit_sparse.attention as attention
from dit_sparse import TokenLayout, sparse_attention
from random_plans import random_plan


def small_case(dtype=torch.float32):
    layout = TokenLayout((2, 6, 10), text_len=7, valid_text_len=(7, 3))
    plan = random_plan(layout, heads=2, block_size=32, batch=2, density=0.4, empty_rows=1, seed=3)
    q, k, v = (torch.randn(2, layout.seq_len, 2, 16).to(dtype) for _ in range(3))
    return plan, q, k, v


def test_flex_compiles_once_eager_would_hold_more_scores_than_the_bound(monkeypatch):
    chosen = []
    eager = attention._flex_attention(False)
    monkeypatch.setattr(attention, "_flex_attention", lambda compiled: chosen.append(compiled) or eager)
    plan, q, k, v = small_case()
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    torch.testing.assert_close(sparse_attention(q, k, v, plan, backend="flex"), ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(attention, "FLEX_EAGER_SCORE_BYTES", 2 * 2 * 127 * 127 * 4 - 1)  # just under 2x2x127x127 fp32
    sparse_attention(q, k, v, plan, backend="flex")
    assert chosen == [False, True]


def test_flex_refuses_with_the_size_and_the_way_out_when_it_cannot_compile(monkeypatch):
    def cannot_compile(compiled):
        def run(*args, **kwargs):
            raise RuntimeError("no working C++ compiler")
        return run

    monkeypatch.setattr(attention, "_flex_attention", cannot_compile)
    monkeypatch.setattr(attention, "FLEX_EAGER_SCORE_BYTES", 0)
    plan, q, k, v = small_case()
    with pytest.raises(RuntimeError, match=r"eager FlexAttention would hold 2x2x127x127 scores.*no working C\+\+ "
                                           r"compiler.*backend='torch'"):
        sparse_attention(q, k, v, plan, backend="flex")


def test_compiled_flex_on_cpu_matches_the_reference(monkeypatch):
    """One compile (about 20 s on two cores): partial blocks, text padding, an empty row."""
    monkeypatch.setattr(attention, "FLEX_EAGER_SCORE_BYTES", 0)
    plan, q, k, v = small_case()
    out = sparse_attention(q, k, v, plan, backend="flex")
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
