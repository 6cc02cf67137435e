"""dit-sparse together with the rest of diffusers: offloading, LoRA, step caches, dtypes, batches and
CFG, attention backends. One test (or more) per row of the compatibility table in
docs/integration.md; torch.compile is in test_integration_compile.py.

Each check has an independent reference: the same combination with the stock dense attention
(a plan that keeps every block computes dense attention through the sparse path), the sparse run
without the other tool, the pipeline's own ``callback_on_step_end`` step, or which attention layers
really ran (seen from their query projections).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict

import pytest
import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_group_offloading,
)
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from tiny_pipelines import build

from dit_sparse import SparseAttentionConfig, apply_sparse_attention, remove_sparse_attention
from dit_sparse.pipelines import adapter_for
from dit_sparse.plan import BlockSparsePlan

DENSE_STEPS = 2
CONFIG = SparseAttentionConfig(pattern="adaptive", density=0.4, block_size=16, dense_steps=DENSE_STEPS, dense_layers=())
FULL = dataclasses.replace(CONFIG, density=1.0)  # every block kept: dense attention computed by the sparse path
STEPS = 6


def close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4) -> None:
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


@pytest.fixture
def fresh(one_thread):
    """``fresh(family)`` -> a newly built tiny case (same weights and inputs every time)."""
    return build


def self_attention(transformer) -> list[torch.nn.Module]:
    return [module for _, module in adapter_for(transformer).self_attention_modules(transformer)]


class Recorder:
    """Which self-attention layers really ran at which step, seen from their query projections (so
    independent of dit-sparse's own counting), and the controller's step at every
    ``callback_on_step_end``."""

    def __init__(self, transformer, controller) -> None:
        self.controller = controller
        self.step = 0
        self.runs: dict[int, list[int]] = defaultdict(list)
        self.steps_seen: list[tuple[int, int]] = []
        self._handles = [
            attention.to_q.register_forward_hook(self._hook(layer))
            for layer, attention in enumerate(self_attention(transformer))
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, layer: int):
        def hook(module, args, output):
            self.runs[layer].append(self.step)

        return hook

    def callback(self, pipe, i, t, callback_kwargs):
        self.steps_seen.append((i, self.controller.step))
        self.step = i + 1
        return callback_kwargs


def check_schedule(stats, recorder: Recorder, steps: int) -> None:
    """The run's statistics against the layers that really ran: dense up to the calibration step,
    sparse after it, and each layer calibrated at its first call from the calibration step on (later
    when a cache skipped it then)."""
    assert recorder.steps_seen == [(i, i) for i in range(steps)]
    calibration_step = DENSE_STEPS - 1
    first_run = {
        layer: min(s for s in runs if s >= calibration_step)
        for layer, runs in recorder.runs.items() if max(runs) >= calibration_step
    }
    assert sorted((p.layer, p.step) for p in stats.plans) == sorted(first_run.items())
    calls = Counter(s for runs in recorder.runs.values() for s in runs)
    assert {s.context for s in stats.steps} == {"cond"}
    assert {s.step: (s.dense, s.sparse, s.calibrations) for s in stats.steps} == {
        step: (
            calls[step] if step <= calibration_step else 0,
            calls[step] if step > calibration_step else 0,
            sum(1 for s in first_run.values() if s == step),
        )
        for step in range(steps)
    }


# ---------------------------------------------------------------------------------------- step caches

FIRST_BLOCK_CACHE_THRESHOLD = {"wan": 0.2, "flux": 0.5}  # the tiny models skip their second block at step 1


def _caches(family: str, pipe) -> dict:
    return {
        "first_block_cache": FirstBlockCacheConfig(threshold=FIRST_BLOCK_CACHE_THRESHOLD[family]),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, use_lite_mode=True),
        "taylorseer_attention": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "mag_cache": MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, retention_ratio=0.0,
                                    max_skip_steps=1, threshold=1.0),
        "pyramid_attention_broadcast": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: pipe.current_timestep,
        ),
    }


CACHE_CASES = [
    ("wan", "first_block_cache"), ("wan", "taylorseer"), ("wan", "mag_cache"), ("wan", "pyramid_attention_broadcast"),
    ("flux", "first_block_cache"), ("flux", "taylorseer_attention"),
]


def _with_cache(family: str, cache: str, config: SparseAttentionConfig | None, sparse_first: bool, fresh):
    """A fresh case with the step cache and (unless ``config`` is None) sparse attention, applied in
    the given order; returns the case and the controller."""
    case = fresh(family)
    transformer = case.pipe.transformer
    controller = None
    if config is not None and sparse_first:
        controller = apply_sparse_attention(case.pipe, config)
    transformer.enable_cache(_caches(family, case.pipe)[cache])
    if config is not None and not sparse_first:
        controller = apply_sparse_attention(case.pipe, config)
    return case, controller


@pytest.mark.parametrize("sparse_first", [False, True], ids=["cache_then_sparse", "sparse_then_cache"])
@pytest.mark.parametrize("family,cache", CACHE_CASES)
def test_step_cache_keeps_the_step_clock_and_calibrates_layers_it_skipped(fresh, family, cache, sparse_first):
    case, controller = _with_cache(family, cache, CONFIG, sparse_first, fresh)
    for _ in range(2):  # the second generation must not take the first one's plans for its skipped layers
        recorder = Recorder(case.pipe.transformer, controller)
        out = case(num_inference_steps=STEPS, guidance_scale=1.0, callback_on_step_end=recorder.callback)
        recorder.remove()
        assert torch.isfinite(out).all()
        check_schedule(controller.last_stats, recorder, STEPS)
        assert controller.last_stats.sparse_calls > 0
        skipped_at_calibration = [runs for runs in recorder.runs.values() if DENSE_STEPS - 1 not in runs]
        assert any(max(runs) > DENSE_STEPS - 1 for runs in skipped_at_calibration)  # ...and calibrated later


@pytest.mark.parametrize("sparse_first", [False, True], ids=["cache_then_sparse", "sparse_then_cache"])
@pytest.mark.parametrize("family,cache", CACHE_CASES)
def test_step_cache_with_sparse_attention_matches_it_with_dense_attention(fresh, family, cache, sparse_first):
    reference, _ = _with_cache(family, cache, None, sparse_first, fresh)
    case, controller = _with_cache(family, cache, FULL, sparse_first, fresh)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=1.0)
    expected = reference(**kwargs)
    assert not torch.allclose(expected, fresh(family)(**kwargs), atol=1e-3)  # the cache skipped work
    close(case(**kwargs), expected)
    assert controller.last_stats.sparse_calls > 0


def test_a_plan_from_before_a_recalibration_step_the_cache_skipped_is_not_reused(fresh):
    config = dataclasses.replace(CONFIG, recalibrate_at=(3,))
    case, controller = _with_cache("wan", "pyramid_attention_broadcast", config, False, fresh)
    recorder = Recorder(case.pipe.transformer, controller)
    case(num_inference_steps=STEPS, guidance_scale=1.0, callback_on_step_end=recorder.callback)
    assert all(3 not in runs and 4 in runs for runs in recorder.runs.values())  # PAB skips odd steps
    assert sorted((p.layer, p.step) for p in controller.last_stats.plans) == [(0, 2), (0, 4), (1, 2), (1, 4)]


# ---------------------------------------------------------------------------------------- offloading

def _count_plan_copies(monkeypatch) -> list:
    copies = []
    original = BlockSparsePlan.to

    def to(self, device):
        moved = original(self, device)
        if moved is not self:
            copies.append(device)
        return moved

    monkeypatch.setattr(BlockSparsePlan, "to", to)
    return copies


@pytest.mark.parametrize("offload", ["model_cpu_offload", "group_block_level", "group_leaf_level"])
def test_offloading_runs_the_hooks_and_never_copies_plans(fresh, monkeypatch, offload):
    plain = fresh("wan")
    apply_sparse_attention(plain.pipe, CONFIG)
    expected = plain(num_inference_steps=STEPS)

    case = fresh("wan")
    controller = apply_sparse_attention(case.pipe, CONFIG)
    if offload == "model_cpu_offload":
        case.pipe.enable_model_cpu_offload(device="cpu")
    else:
        apply_group_offloading(case.pipe.transformer, onload_device=torch.device("cpu"),
                               offload_type=offload.removeprefix("group_"), num_blocks_per_group=1)
    transformer = case.pipe.transformer
    assert hasattr(transformer, "_hf_hook") if offload == "model_cpu_offload" else _is_group_offload_enabled(transformer)
    copies = _count_plan_copies(monkeypatch)
    for _ in range(2):
        assert torch.equal(case(num_inference_steps=STEPS), expected)
    stats = controller.last_stats
    assert stats.sparse_calls > 0 and stats.calibrations == 2 * len(self_attention(transformer))  # cond, uncond
    assert copies == []
    assert {entry.plan.device for _, entry in controller.plans.items()} == {torch.device("cpu")}


# ---------------------------------------------------------------------------------------- LoRA

@pytest.fixture
def lora_dir(tmp_path, fresh):
    """A rank-4 LoRA on every attention projection of the tiny Wan, random, saved as diffusers saves one."""
    peft = pytest.importorskip("peft", reason="LoRA needs peft: pip install -e '.[test]'")
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    transformer = fresh("wan").pipe.transformer
    torch.manual_seed(1)
    transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return tmp_path


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora_then_sparse", "sparse_then_lora"])
def test_sparse_attention_runs_on_the_lora_projections(fresh, lora_dir, lora_first):
    stock = fresh("wan")
    stock_out = stock()
    stock.pipe.load_lora_weights(lora_dir, adapter_name="style")
    reference = stock()
    assert not torch.allclose(reference, stock_out, atol=1e-3)  # the LoRA changes the output

    case = fresh("wan")
    if lora_first:
        case.pipe.load_lora_weights(lora_dir, adapter_name="style")
    controller = apply_sparse_attention(case.pipe, FULL)
    if not lora_first:
        case.pipe.load_lora_weights(lora_dir, adapter_name="style")
    close(case(), reference)
    assert controller.last_stats.sparse_calls > 0

    stock.pipe.set_adapters(["style"], [0.5])
    case.pipe.set_adapters(["style"], [0.5])
    close(case(), stock())


def test_fused_and_unloaded_lora_keep_sparse_attention_working(fresh, lora_dir):
    no_lora = fresh("wan")
    apply_sparse_attention(no_lora.pipe, CONFIG)
    without = no_lora()

    case = fresh("wan")
    controller = apply_sparse_attention(case.pipe, CONFIG)
    case.pipe.load_lora_weights(lora_dir, adapter_name="style")
    with_lora = case()
    case.pipe.fuse_lora()
    close(case(), with_lora)
    case.pipe.unfuse_lora()  # W + BA - BA: the base weights come back to rounding
    case.pipe.unload_lora_weights()
    close(case(), without)
    assert controller.last_stats.sparse_calls > 0


# ---------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pipeline_moved_to_a_half_dtype_after_applying(fresh, dtype):
    reference = fresh("wan")
    reference.pipe.to(dtype)
    expected = reference()
    case = fresh("wan")
    controller = apply_sparse_attention(case.pipe, FULL)
    case.pipe.to(dtype)
    out = case()
    assert out.dtype == expected.dtype
    close(out.float(), expected.float(), tolerance=5e-2)
    assert controller.last_stats.sparse_calls > 0


def test_plans_survive_to_dtype(fresh, tmp_path):
    case = fresh("wan")
    controller = apply_sparse_attention(case.pipe, dataclasses.replace(CONFIG, reuse_plans=True))
    case()
    controller.save_plans(tmp_path / "plans.safetensors")
    case.pipe.to(torch.bfloat16)
    survived = case()
    assert controller.last_stats.calibrations == 0 and controller.last_stats.sparse_calls > 0

    loaded = apply_sparse_attention(case.pipe, dataclasses.replace(CONFIG, reuse_plans=True))
    loaded.load_plans(tmp_path / "plans.safetensors")
    assert torch.equal(case(), survived)


# ---------------------------------------------------------------------------------------- batch and CFG

def test_videos_per_prompt_are_planned_one_by_one(fresh):
    case = fresh("wan")
    controller = apply_sparse_attention(case.pipe, CONFIG)
    latents = torch.randn(2, 16, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    batched = case(num_videos_per_prompt=2, latents=latents)
    assert controller.last_stats.sparse_calls > 0
    for i in range(2):
        close(batched[i : i + 1], case(latents=latents[i : i + 1]), tolerance=1e-5)


@pytest.mark.parametrize("guidance_scale,negative", [(1.0, False), (5.0, True), (5.0, False)],
                         ids=["no_cfg", "cfg_negative_prompt", "cfg_other_negative_prompt"])
def test_cfg_on_and_off(fresh, guidance_scale, negative):
    overrides = {"guidance_scale": guidance_scale}
    if not negative:
        overrides["negative_prompt_embeds"] = torch.zeros(1, 8, 32)
    reference = fresh("wan")
    expected = reference(**overrides)
    case = fresh("wan")
    controller = apply_sparse_attention(case.pipe, FULL)
    recorder = Recorder(case.pipe.transformer, controller)
    close(case(callback_on_step_end=recorder.callback, **overrides), expected)
    contexts = {s.context for s in controller.last_stats.steps}
    assert contexts == ({"cond", "uncond"} if guidance_scale > 1 else {"cond"})
    assert {p.context for p in controller.last_stats.plans} == contexts
    assert recorder.steps_seen == [(i, i) for i in range(case.steps)]


@pytest.mark.parametrize("boundary_ratio", [0.99, 0.9, 0.5])
def test_wan22_experts_at_any_boundary(fresh, boundary_ratio):
    case = fresh("wan22")
    case.pipe.register_to_config(boundary_ratio=boundary_ratio)
    controller = apply_sparse_attention(case.pipe, CONFIG)
    seen = []

    def callback(pipe, i, t, callback_kwargs):
        seen.append((i, float(t), controller.step))
        return callback_kwargs

    case(callback_on_step_end=callback)
    assert [step for _, _, step in seen] == list(range(case.steps))
    boundary = boundary_ratio * case.pipe.scheduler.config.num_train_timesteps
    experts = {"transformer": [i for i, t, _ in seen if t >= boundary],
               "transformer_2": [i for i, t, _ in seen if t < boundary]}
    for name, steps in experts.items():
        phases = {s.step: "sparse" if s.sparse else "calibrate" if s.calibrations else "dense"
                  for s in controller.last_stats.steps if s.transformer == name and s.context == "cond"}
        expected = {step: "dense" if n < DENSE_STEPS - 1 else "calibrate" if n == DENSE_STEPS - 1 else "sparse"
                    for n, step in enumerate(steps)}
        if len(steps) < DENSE_STEPS + 1:  # no sparse step can follow: the warm-up does not calibrate
            expected = dict.fromkeys(steps, "dense")
        assert phases == expected, name


# ---------------------------------------------------------------------------------------- attention backends

@pytest.fixture
def active_backend():
    """``set_attention_backend`` also sets diffusers' process-wide default backend: restore it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    yield lambda: _AttentionBackendRegistry.set_active_backend(default)
    _AttentionBackendRegistry.set_active_backend(default)


def test_attention_backend_set_after_applying_serves_the_dense_steps(fresh, active_backend):
    stock = fresh("wan")
    default_out = stock()
    stock.pipe.transformer.set_attention_backend("_native_math")
    active_backend()  # from here on only the processors name the backend
    expected = stock()
    assert not torch.equal(expected, default_out)  # the math backend rounds differently from the default

    case = fresh("wan")
    controller = apply_sparse_attention(case.pipe, CONFIG)
    case.pipe.transformer.set_attention_backend("_native_math")
    active_backend()
    controller.force_dense = True
    assert torch.equal(case(), expected)
    controller.force_dense = False
    assert torch.isfinite(case()).all() and controller.last_stats.sparse_calls > 0


def test_attention_slicing_leaves_these_transformers_alone(fresh):
    case = fresh("wan")
    controller = apply_sparse_attention(case.pipe, CONFIG)
    expected = case()
    case.pipe.enable_attention_slicing()
    assert torch.equal(case(), expected) and controller.last_stats.sparse_calls > 0


def test_another_processor_set_after_applying_is_refused(fresh):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    case = fresh("wan")
    apply_sparse_attention(case.pipe, CONFIG)
    case.pipe.transformer.set_attn_processor(WanAttnProcessor())
    with pytest.raises(RuntimeError, match="no longer runs the dit-sparse processor.*remove_sparse_attention"):
        case()
    remove_sparse_attention(case.pipe)
    assert torch.equal(case(), fresh("wan")())
