"""The hook's step against ``callback_on_step_end``'s ``i``, the ground truth of every pipeline."""

import pytest

from dit_sparse import SparseAttentionConfig, apply_sparse_attention

CONFIG = SparseAttentionConfig(pattern="adaptive", density=0.4, block_size=16, dense_steps=2, dense_layers=())


def run_recording(case, controller):
    """Run the case; returns ``(i, t, hook step)`` at every ``callback_on_step_end``."""
    seen = []

    def callback(pipe, i, t, callback_kwargs):
        seen.append((i, float(t), controller.step))
        return callback_kwargs

    case(callback_on_step_end=callback)
    return seen


def phases_by_step(stats, transformer):
    """``{step: "dense" | "calibrate" | "sparse"}`` of one transformer from the run statistics."""
    out = {}
    for s in stats.steps:
        if s.transformer == transformer:
            out[s.step] = "sparse" if s.sparse else "calibrate" if s.calibrations else "dense"
    return out


@pytest.mark.parametrize(
    "family,contexts",
    [
        ("wan", {"cond", "uncond"}),  # separate CFG calls, step_index from the cache context
        ("hunyuan_video", {"cond", "uncond"}),  # separate CFG calls (true CFG), steps from the timestep
        ("wan22_ti2v", {"cond", "uncond"}),  # per-token timestep (expand_timesteps), no step_index
        ("cogvideox", {"cond_uncond"}),  # batched CFG, DDIM: no scheduler step_index at all
        ("ltx", {"cond_uncond"}),  # batched CFG, flow matching
        ("flux", {"cond"}),  # guidance-distilled: one call per step
    ],
)
def test_hook_step_is_the_callback_step(tiny, family, contexts):
    case = tiny(family)
    controller = apply_sparse_attention(case.pipe, CONFIG)
    seen = run_recording(case, controller)
    assert [i for i, _, _ in seen] == list(range(case.steps))
    assert [step for _, _, step in seen] == [i for i, _, _ in seen]
    stats = controller.last_stats
    assert {s.context for s in stats.steps} == contexts
    assert sorted({s.step for s in stats.steps}) == list(range(case.steps))
    expected = {0: "dense", 1: "calibrate", **{i: "sparse" for i in range(2, case.steps)}}
    assert phases_by_step(stats, "transformer") == expected


def test_second_expert_gets_its_own_warm_up(tiny):
    case = tiny("wan22")
    controller = apply_sparse_attention(case.pipe, CONFIG)
    seen = run_recording(case, controller)
    assert [step for _, _, step in seen] == list(range(case.steps))
    boundary = case.pipe.config.boundary_ratio * case.pipe.scheduler.config.num_train_timesteps
    high_noise = [i for i, t, _ in seen if t >= boundary]
    low_noise = [i for i, t, _ in seen if t < boundary]
    assert len(high_noise) >= 3 and len(low_noise) >= 3
    stats = controller.last_stats

    def expected(steps):
        return {step: "dense" if n == 0 else "calibrate" if n == 1 else "sparse" for n, step in enumerate(steps)}

    assert phases_by_step(stats, "transformer") == expected(high_noise)
    assert phases_by_step(stats, "transformer_2") == expected(low_noise)


def test_hooks_reset_after_each_pipeline_call(tiny):
    case = tiny("cogvideox")
    controller = apply_sparse_attention(case.pipe, CONFIG)
    for generation in (1, 2):
        case()
        assert controller.step is None  # maybe_free_model_hooks reset the stateful hook
        assert controller.generation == generation
        assert [s.step for s in controller.last_stats.steps] == list(range(case.steps))
