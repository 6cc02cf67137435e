import pytest
import torch

from dit_sparse import SparseAttentionConfig, SparseAttentionController, TokenLayout, sparse_attention
from dit_sparse.config import PATTERNS as ALL_PATTERNS
from dit_sparse.planner import build_plan

LAYOUT = TokenLayout((2, 4, 8), text_len=6, text_first=True)
PATTERNS = [p for p in ALL_PATTERNS if p != "dense"]


def config(**overrides) -> SparseAttentionConfig:
    return SparseAttentionConfig(**{"pattern": "adaptive", "density": 0.4, "block_size": 16, "dense_layers": (),
                                    "dense_steps": 2, **overrides})


def qkv(seed: int, batch: int = 1, layout: TokenLayout = LAYOUT):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, layout.seq_len, 2, 8, generator=g) for _ in range(3))


def dense_of(query, key, value):
    return lambda: torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)


def run(controller, timesteps, contexts=("cond",), layers=2, layout=LAYOUT, batch=1):
    """One generation with separate CFG calls; returns each call's outputs per layer."""
    outputs = []
    for t in timesteps:
        for context in contexts:
            controller.begin_call("transformer", context, layout, timestep=t)
            for layer in range(layers):
                q, k, v = qkv(layer, batch, layout)
                outputs.append(controller.attend("transformer", layer, q, k, v, dense_of(q, k, v)))
            controller.end_call("transformer")
    controller.finish_generation()
    return outputs


@pytest.mark.parametrize("pattern", PATTERNS)
def test_dense_warm_up_then_calibrated_plans(pattern):
    controller = SparseAttentionController(config(pattern=pattern, min_recall=0.0), total_steps=lambda: 4)
    outputs = run(controller, (900.0, 700.0, 500.0, 300.0), layers=2)
    stats = controller.last_stats
    assert [(s.step, s.dense, s.sparse, s.calibrations) for s in stats.steps] == [
        (0, 2, 0, 0), (1, 2, 0, 2), (2, 0, 2, 0), (3, 0, 2, 0)]
    q, k, v = qkv(1)
    assert torch.equal(outputs[1], dense_of(q, k, v)())  # dense steps give the dense output
    plan, _ = build_plan(q, k, LAYOUT, config(pattern=pattern, min_recall=0.0), v=v)
    assert torch.equal(outputs[-1], sparse_attention(q, k, v, plan))  # later steps: the plan of step 1
    # the peers' rules are dense on this 2-frame, 70-token layout (adjacent frames, 128-token bands)
    assert 0 < stats.mean_sparse_density < 1 or pattern in ("radial_paper", "svg1")
    assert len(stats.plans) == 2 and stats.plans[0].step == 1


def test_auto_by_error_calibrates_with_the_calls_values():
    controller = SparseAttentionController(config(pattern="auto"), total_steps=lambda: 3)
    outputs = run(controller, (900.0, 700.0, 500.0), layers=1)
    q, k, v = qkv(0)
    plan, report = build_plan(q, k, LAYOUT, config(pattern="auto"), v=v)
    assert torch.equal(outputs[-1], sparse_attention(q, k, v, plan))
    assert controller.last_stats.plans[0].error == report.error.tolist()


def test_cfg_contexts_get_their_own_plans_or_share_one():
    per_context = SparseAttentionController(config(), total_steps=lambda: 3)
    run(per_context, (900.0, 700.0, 500.0), contexts=("cond", "uncond"))
    assert {key.context for key, _ in per_context.plans.items()} == {"cond", "uncond"}
    shared = SparseAttentionController(config(per_context_plans=False), total_steps=lambda: 3)
    run(shared, (900.0, 700.0, 500.0), contexts=("cond", "uncond"))
    assert {key.context for key, _ in shared.plans.items()} == {"shared"}
    calibrations = {(s.step, s.context): s.calibrations for s in shared.last_stats.steps}
    assert calibrations[(1, "cond")] == 2 and calibrations[(1, "uncond")] == 0
    assert all(s.sparse == 2 for s in shared.last_stats.steps if s.step == 2)


def test_zero_dense_steps_calibrates_on_the_first_sparse_call():
    controller = SparseAttentionController(config(dense_steps=0), total_steps=lambda: 2)
    run(controller, (900.0, 700.0))
    assert [(s.dense, s.sparse, s.calibrations) for s in controller.last_stats.steps] == [(0, 2, 2), (0, 2, 0)]


def test_every_generation_calibrates_anew():
    controller = SparseAttentionController(config(), total_steps=lambda: 3)
    run(controller, (900.0, 700.0, 500.0))
    run(controller, (900.0, 700.0, 500.0))
    assert controller.generation == 2 and controller.last_stats.calibrations == 2
    assert {entry.generation for _, entry in controller.plans.items()} == {2}


def test_reused_plans_serve_later_generations_of_the_same_layout():
    controller = SparseAttentionController(config(reuse_plans=True), total_steps=lambda: 3)
    run(controller, (900.0, 700.0, 500.0))
    first = {key: entry.plan for key, entry in controller.plans.items()}
    run(controller, (900.0, 700.0, 500.0))
    assert controller.last_stats.calibrations == 0 and controller.last_stats.sparse_calls == 2
    assert {key: entry.plan for key, entry in controller.plans.items()} == first
    other = TokenLayout((3, 4, 8), text_len=6, text_first=True)
    run(controller, (900.0, 700.0, 500.0), layout=other)  # a new layout still calibrates
    assert controller.last_stats.calibrations == 2


def test_a_larger_timestep_without_a_reset_is_a_new_generation():
    controller = SparseAttentionController(config(), total_steps=lambda: 3)
    for t in (900.0, 700.0, 500.0, 900.0):
        controller.begin_call("transformer", "cond", LAYOUT, timestep=t)
    assert controller.generation == 2 and controller.step == 0
    assert [s.step for s in controller.last_stats.steps] == [0, 1, 2]


def test_loaded_plans_skip_calibration_and_pin_the_layout(tmp_path):
    first = SparseAttentionController(config(), total_steps=lambda: 3)
    reference = run(first, (900.0, 700.0, 500.0))
    first.save_plans(tmp_path / "plans.safetensors")

    second = SparseAttentionController(config(), total_steps=lambda: 3)
    assert second.load_plans(tmp_path / "plans.safetensors") == 2
    outputs = run(second, (900.0, 700.0, 500.0))
    assert second.last_stats.calibrations == 0
    assert all(torch.equal(a, b) for a, b in zip(outputs, reference))

    other = TokenLayout((3, 4, 8), text_len=6, text_first=True)
    refused = r"loaded plans are for layouts grid \(2, 4, 8\) \+ 6.*this call has grid \(3, 4, 8\).*clear_plans"
    with pytest.raises(ValueError, match=refused):
        second.begin_call("transformer", "cond", other, timestep=900.0)
    second.finish_generation()
    second.clear_plans()
    run(second, (900.0, 700.0, 500.0), layout=other)
    assert second.last_stats.calibrations == 2


def test_force_dense_and_calls_outside_a_forward_pass_are_dense():
    controller = SparseAttentionController(config(), total_steps=lambda: 3)
    controller.force_dense = True
    run(controller, (900.0, 700.0, 500.0))
    assert controller.last_stats.sparse_calls == 0 and controller.last_stats.calibrations == 0
    q, k, v = qkv(0)
    assert torch.equal(controller.attend("transformer", 0, q, k, v, dense_of(q, k, v)), dense_of(q, k, v)())


def test_batched_cfg_gets_a_plan_per_batch_element():
    controller = SparseAttentionController(config(), total_steps=lambda: 3)
    run(controller, (900.0, 700.0, 500.0), contexts=("cond_uncond",), batch=2)
    assert all(entry.plan.batch_size == 2 for _, entry in controller.plans.items())
    shared = SparseAttentionController(config(per_context_plans=False), total_steps=lambda: 3)
    run(shared, (900.0, 700.0, 500.0), contexts=("cond_uncond",), batch=2)
    assert all(entry.plan.batch_size == 1 for _, entry in shared.plans.items())


def test_a_fraction_of_an_unknown_run_is_a_clear_error_and_leaves_the_clock_clean():
    controller = SparseAttentionController(config(dense_steps=0.5))
    with pytest.raises(ValueError, match="fraction of the run"):
        controller.begin_call("transformer", None, LAYOUT, timestep=900.0)
    assert controller.step is None
    controller.begin_call("transformer", None, LAYOUT, timestep=900.0, total_steps=4)
    assert controller.step == 0
