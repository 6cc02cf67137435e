"""The per-step plan check (``recalibrate_error``): its error against masked dense attention, and the
controller re-planning a layer exactly when that error passes the bound."""

import math

import pytest
import torch

from dit_sparse import BlockSparsePlan, SparseAttentionConfig, SparseAttentionController, TokenLayout, sparse_attention
from dit_sparse.drift import plan_error
from dit_sparse.output_error import sample_rows
from dit_sparse.planner import build_plan
from random_plans import random_orders, random_starts

LAYOUT = TokenLayout((2, 4, 8), text_len=6)


def reference_error(q, k, v, plan, rows):
    """``[B, H]`` relative error of the plan's output at ``rows``, by dense SDPA under its token mask."""
    n = LAYOUT.num_blocks(1024)
    full = BlockSparsePlan.from_block_mask(torch.ones(q.shape[2], n, n, dtype=torch.bool), plan.layout, 1024)
    dense, sparse = (sparse_attention(q, k, v, p, backend="torch_reference")[:, rows] for p in (full, plan))
    return ((sparse - dense).pow(2).sum((1, 3)) / dense.pow(2).sum((1, 3))).sqrt()


@pytest.mark.parametrize("variable", [False, True])
def test_plan_error_is_the_error_of_masked_dense_attention_on_the_sampled_rows(variable):
    g = torch.Generator().manual_seed(3)
    heads, blocks = 3, (16, 16)
    q, k, v = (torch.randn(2, LAYOUT.seq_len, heads, 8, generator=g) * 2 for _ in range(3))
    starts = {}
    if variable:
        starts = {"q_starts": random_starts(LAYOUT, 16, heads, 2, g), "kv_starts": random_starts(LAYOUT, 16, heads, 2, g)}
    n_q = starts["q_starts"].shape[-1] - 1 if variable else LAYOUT.num_blocks(16)
    n_k = starts["kv_starts"].shape[-1] - 1 if variable else LAYOUT.num_blocks(16)
    mask = torch.rand(2, heads, n_q, n_k, generator=g) < 0.4
    plan = BlockSparsePlan.from_block_mask(mask, LAYOUT, blocks, q_order=random_orders(LAYOUT, heads, 2, g),
                                           kv_order=random_orders(LAYOUT, heads, 2, g), **starts)
    error = plan_error(plan, q, k, v, rows=12, seed=5)
    expected = reference_error(q, k, v, plan, sample_rows(LAYOUT, 12, seed=5))
    assert error.shape == (2, heads) and (expected > 0.01).all()
    torch.testing.assert_close(error, expected, atol=1e-4, rtol=1e-4)


def config(bound: float | None) -> SparseAttentionConfig:
    return SparseAttentionConfig(pattern="adaptive", density=0.3, block_size=16, dense_layers=(), dense_steps=1,
                                 recalibrate_error=bound, check_rows=16)


def local(seed: int, shift: int = 0):
    """Video queries that attend the video key ``shift`` tokens before them (peaked attention:
    scaled copies)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, LAYOUT.seq_len, 2, 32, generator=g)
    video = LAYOUT.video_len
    keys = torch.cat([x[:, :video].roll(shift, 1), x[:, video:]], 1)
    return x * 2, keys * 2, torch.randn(1, LAYOUT.seq_len, 2, 32, generator=g)


def generate(controller: SparseAttentionController, calls: list[tuple]) -> list[torch.Tensor]:
    """One generation, one layer, one step per ``(q, k, v)`` call."""
    outputs = []
    for step, (q, k, v) in enumerate(calls):
        controller.begin_call("transformer", "cond", LAYOUT, step_index=step)
        dense = lambda q=q, k=k, v=v: sparse_attention(q, k, v, BlockSparsePlan.from_block_mask(
            torch.ones(2, 5, 5, dtype=torch.bool), LAYOUT, 16), backend="torch_reference")
        outputs.append(controller.attend("transformer", 0, q, k, v, dense))
        controller.end_call("transformer")
    controller.finish_generation()
    return outputs


def test_a_layer_is_planned_again_exactly_when_its_plan_drifts_past_the_bound():
    steady, moved = local(0), local(0, shift=32)
    calls = [steady, steady, moved, moved]          # step 0 calibrates; the keys move at step 2
    measured = SparseAttentionController(config(math.inf), total_steps=lambda: 4)
    generate(measured, calls)
    checks = measured.last_stats.checks
    assert [(c.step, c.plan_step, c.recalibrated) for c in checks] == [(1, 0, False), (2, 0, False), (3, 0, False)]
    plan, _ = build_plan(*steady[:2], LAYOUT, config(None))
    for check, call in zip(checks, calls[1:]):
        expected = plan_error(plan, *call, rows=16, seed=check.step)
        torch.testing.assert_close(torch.tensor(check.error), expected)
        assert check.mean_error == pytest.approx(float(expected.double().mean()))
    low, high = checks[0].mean_error, checks[1].mean_error
    assert high > 2 * low

    bound = (low + high) / 2
    controller = SparseAttentionController(config(bound), total_steps=lambda: 4)
    outputs = generate(controller, calls)
    stats = controller.last_stats
    assert [(c.step, c.plan_step, c.recalibrated) for c in stats.checks] == [(1, 0, False), (2, 0, True), (3, 2, False)]
    assert [p.step for p in stats.plans] == [0, 2]
    assert [s.calibrations for s in stats.steps] == [1, 0, 1, 0] and [s.sparse for s in stats.steps] == [0, 1, 1, 1]
    replanned, _ = build_plan(*moved[:2], LAYOUT, config(None))
    assert torch.equal(outputs[1], sparse_attention(*steady, plan))
    assert torch.equal(outputs[2], sparse_attention(*moved, replanned))     # planned from step 2, no dense pass
    assert stats.checks[2].mean_error < bound


def test_bound_zero_plans_every_sparse_step_and_none_checks_nothing():
    calls = [local(seed) for seed in range(4)]
    every = SparseAttentionController(config(0.0), total_steps=lambda: 4)
    outputs = generate(every, calls)
    assert [p.step for p in every.last_stats.plans] == [0, 1, 2, 3]
    for out, call in zip(outputs[1:], calls[1:]):
        assert torch.equal(out, sparse_attention(*call, build_plan(*call[:2], LAYOUT, config(None))[0]))
    off = SparseAttentionController(config(None), total_steps=lambda: 4)
    generate(off, calls)
    assert off.last_stats.checks == [] and [p.step for p in off.last_stats.plans] == [0]


@pytest.mark.parametrize(("fields", "message"), [
    ({"recalibrate_error": -0.1}, "recalibrate_error must be a number >= 0"),
    ({"recalibrate_error": "0.1"}, "recalibrate_error must be a number >= 0"),
    ({"recalibrate_error": math.nan}, "recalibrate_error must be a number >= 0"),
    ({"recalibrate_error": True}, "recalibrate_error must be a number >= 0"),
    ({"check_rows": 0}, "check_rows must be an int >= 1"),
])
def test_bad_check_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SparseAttentionConfig(**fields)
