"""SparsePipeline and the plan cache on real (tiny) pipelines: layouts, plan files, statistics,
checkpoints, and the errors users meet."""

import json

import pytest
import torch

from dit_sparse import SparseAttentionConfig, SparsePipeline, apply_sparse_attention, remove_sparse_attention
from dit_sparse.pipelines.hooks import _SPARSE_ATTENTION_HOOK

CONFIG = SparseAttentionConfig(pattern="adaptive", density=0.4, block_size=16, dense_steps=1, dense_layers=())


def test_sparse_pipeline_runs_sparse_and_its_dense_context_is_the_stock_pipeline(tiny):
    case = tiny("wan")
    sp = SparsePipeline(case.pipe, CONFIG)
    assert sp.pipe is case.pipe and sp.config is CONFIG
    out = case(sp)
    stats = sp.last_stats
    assert stats.wall_seconds > 0 and stats.sparse_calls > 0 and stats.calibration_seconds > 0
    assert not torch.equal(out, case.stock)
    with sp.dense():
        assert torch.equal(case(sp), case.stock)
    assert sp.last_stats.sparse_calls == 0 and sp.last_stats.attention_calls == stats.attention_calls
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["sparse_calls"] == stats.sparse_calls and len(data["steps"]) == 2 * case.steps
    plan = data["plans"][0]
    assert plan["grid"] == [5, 4, 4] and plan["step"] == 0 and len(plan["family"][0]) == 2
    assert all(0 < r <= 1 for row in plan["recall"] for r in row)
    assert all(0 < d < 1 for row in plan["density"] for d in row)


def test_a_failed_call_leaves_no_steps_behind(tiny):
    case = tiny("hunyuan_video")  # steps from timesteps: a stale clock would swallow the next run's first step
    sp = SparsePipeline(case.pipe, CONFIG)

    def fail(pipe, i, t, callback_kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        case(sp, callback_on_step_end=fail)
    out = case(sp)
    assert [s.step for s in sp.last_stats.steps if s.context == "cond"] == list(range(case.steps))
    assert torch.equal(out, case(SparsePipeline(case.pipe, CONFIG)))


def test_new_resolution_or_frame_count_calibrates_anew(tiny):
    case = tiny("wan")
    sp = SparsePipeline(case.pipe, CONFIG)
    case(sp)
    other = case(sp, height=96, width=64, num_frames=9)
    assert {p.grid for p in sp.last_stats.plans} == {(3, 6, 4)}
    assert {key.geometry[0] for key, _ in sp.controller.plans.items()} == {(5, 4, 4), (3, 6, 4)}
    fresh = SparsePipeline(case.pipe, CONFIG)  # applying again replaces the hooks with fresh state
    assert torch.equal(case(fresh, height=96, width=64, num_frames=9), other)


def test_plans_save_and_load_skip_calibration(tiny, tmp_path):
    case = tiny("hunyuan_video")
    sp = SparsePipeline(case.pipe, CONFIG)
    calibrated = case(sp)
    sp.save_plans(tmp_path / "plans.safetensors")

    loaded = SparsePipeline(case.pipe, CONFIG)
    assert loaded.load_plans(tmp_path / "plans.safetensors") == len(sp.controller.plans)
    assert torch.equal(case(loaded), calibrated)
    assert loaded.last_stats.calibrations == 0 and loaded.last_stats.sparse_calls == sp.last_stats.sparse_calls


def test_mismatched_plan_files_are_refused(tiny, tmp_path):
    wan = tiny("wan")
    sp = SparsePipeline(wan.pipe, CONFIG)
    case_output = wan(sp)
    assert torch.isfinite(case_output).all()
    path = tmp_path / "wan.safetensors"
    sp.save_plans(path)

    other_config = SparsePipeline(wan.pipe, SparseAttentionConfig(pattern="adaptive", density=0.3, block_size=16))
    with pytest.raises(ValueError, match=r"another config \(density: file 0.4, here 0.3\)"):
        other_config.load_plans(path)
    other_model = SparsePipeline(tiny("cogvideox").pipe, CONFIG)
    with pytest.raises(ValueError, match="another model.*CogVideoXTransformer3DModel"):
        other_model.load_plans(path)
    other_layout = SparsePipeline(wan.pipe, CONFIG)
    other_layout.load_plans(path)
    refused = r"loaded plans are for layouts grid \(5, 4, 4\).*this call has grid \(3, 6, 4\)"
    with pytest.raises(ValueError, match=refused):
        wan(other_layout, height=96, width=64, num_frames=9)


def test_a_pipeline_loaded_from_disk_works_wrapped(tiny, tmp_path):
    # CogVideoX: loading Wan needs accelerate (diffusers keeps some Wan modules in fp32 while loading)
    case = tiny("cogvideox")
    reference = case(SparsePipeline(case.pipe, CONFIG))
    remove_sparse_attention(case.pipe)
    case.pipe.save_pretrained(tmp_path / "tiny")
    reloaded = type(case.pipe).from_pretrained(tmp_path / "tiny", vae=None, text_encoder=None, tokenizer=None)
    reloaded.set_progress_bar_config(disable=True)
    sp = SparsePipeline(reloaded, CONFIG)
    assert torch.equal(case(sp), reference) and sp.last_stats.sparse_calls > 0


def test_applying_twice_replaces_and_the_hook_has_a_fixed_name(tiny):
    case = tiny("flux")
    first = apply_sparse_attention(case.pipe, CONFIG)
    once = case()
    second = apply_sparse_attention(case.pipe, CONFIG)
    registry = case.pipe.transformer._diffusers_hook
    assert registry._hook_order.count(_SPARSE_ATTENTION_HOOK) == 1
    assert all(m.processor.controller is second for _, m in registry.get_hook(_SPARSE_ATTENTION_HOOK).modules)
    assert torch.equal(case(), once) and first.last_stats.sparse_calls == second.last_stats.sparse_calls
    remove_sparse_attention(case.pipe)
    assert torch.equal(case(), case.stock)


def test_flux_single_stream_blocks_know_the_text_length(tiny):
    case = tiny("flux")
    sp = SparsePipeline(case.pipe, CONFIG)
    case(sp)
    layers = len(case.pipe.transformer.transformer_blocks) + len(case.pipe.transformer.single_transformer_blocks)
    plans = sp.last_stats.plans
    assert sorted(p.layer for p in plans) == list(range(layers))
    assert {(p.grid, p.text_len) for p in plans} == {((1, 8, 8), 8)}


def test_time_options(tiny):
    case = tiny("wan22")  # 6 steps: 3 per expert
    config = SparseAttentionConfig(pattern="adaptive", density=0.4, block_size=16, dense_steps=1, dense_layers=(1,),
                                   recalibrate_at=(2,), dense_last_steps=1)
    sp = SparsePipeline(case.pipe, config)
    case(sp)
    by_step = {}
    for s in sp.last_stats.steps:
        if s.context == "cond":
            by_step[s.step] = (s.transformer, s.dense, s.sparse, s.calibrations)
    assert by_step == {
        0: ("transformer", 2, 0, 1),  # layer 1 always dense; layer 0 calibrates at its last dense step
        1: ("transformer", 1, 1, 0),
        2: ("transformer", 2, 0, 1),  # recalibration: a dense pass that measures again
        3: ("transformer_2", 2, 0, 1),  # the second expert's own warm-up
        4: ("transformer_2", 1, 1, 0),
        5: ("transformer_2", 2, 0, 0),  # dense last step
    }


def test_per_context_plans_off_shares_one_plan_between_cond_and_uncond(tiny):
    case = tiny("wan")
    sp = SparsePipeline(case.pipe, SparseAttentionConfig(pattern="adaptive", density=0.4, block_size=16,
                                                         dense_steps=1, dense_layers=(), per_context_plans=False))
    case(sp)
    assert {key.context for key, _ in sp.controller.plans.items()} == {"shared"}
    assert {(p.context, p.step) for p in sp.last_stats.plans} == {("shared", 0)}


# ----------------------------------------------------------------- errors


def test_unsupported_transformer_names_the_supported_ones():
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16,
                                        pooled_projection_dim=8, out_channels=4)
    with pytest.raises(ValueError, match="does not support SD3Transformer2DModel; supported transformers: "
                                         "CogVideoXTransformer3DModel, FluxTransformer2DModel, HunyuanVideo"):
        apply_sparse_attention(transformer, CONFIG)


def test_pipeline_without_a_transformer():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 4), norm_num_groups=2,
                       add_attention=False, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ValueError, match="DDPMPipeline has no transformer component"):
        SparsePipeline(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), CONFIG)
    with pytest.raises(TypeError, match="expected a diffusers pipeline or transformer"):
        apply_sparse_attention("wan", CONFIG)


def test_bad_config_values(tiny):
    case = tiny("ltx")
    with pytest.raises(TypeError, match="config must be a SparseAttentionConfig"):
        apply_sparse_attention(case.pipe, {"density": 0.2})
    with pytest.raises(ValueError, match="density must lie in"):
        SparsePipeline(case.pipe, SparseAttentionConfig(density=2.0))


def test_fraction_of_the_run_on_a_bare_transformer(tiny):
    case = tiny("wan")
    transformer = case.pipe.transformer
    apply_sparse_attention(transformer, SparseAttentionConfig(pattern="adaptive", block_size=16, dense_steps=0.5))
    inputs = {"hidden_states": torch.randn(1, 16, 5, 8, 8), "timestep": torch.tensor([999]),
              "encoder_hidden_states": torch.randn(1, 8, 32)}
    with pytest.raises(ValueError, match="fraction of the run.*cache_context"):
        transformer(**inputs)
    with transformer.cache_context("cond", num_inference_steps=4):
        assert torch.isfinite(transformer(**inputs)[0]).all()


def test_foreign_processors_are_refused_not_dropped(tiny):
    from diffusers.models.attention_processor import AttnProcessor2_0

    case = tiny("hunyuan_video")
    attn = case.pipe.transformer.single_transformer_blocks[0].attn
    stock = attn.processor
    attn.set_processor(AttnProcessor2_0())
    try:
        refused = "single_transformer_blocks.0.attn runs AttnProcessor2_0.*HunyuanVideoAttnProcessor2_0"
        with pytest.raises(ValueError, match=refused):
            apply_sparse_attention(case.pipe, CONFIG)
    finally:
        attn.set_processor(stock)


def test_cogvideox_fused_projections(tiny):
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0

    case = tiny("cogvideox")
    transformer = case.pipe.transformer
    apply_sparse_attention(case.pipe, CONFIG)
    transformer.fuse_qkv_projections()  # replaces the sparse processors on every layer
    with pytest.raises(RuntimeError, match="no longer runs the dit-sparse processor.*fuse_qkv_projections"):
        case()
    remove_sparse_attention(case.pipe)
    transformer.unfuse_qkv_projections()  # puts back the processors it saw when fusing: sparse ones
    remove_sparse_attention(case.pipe)  # ... which remove unwraps
    assert {type(p) for p in transformer.attn_processors.values()} == {CogVideoXAttnProcessor2_0}
    assert torch.equal(case(), case.stock)

    transformer.fuse_qkv_projections()  # fusing first is supported: the fused processor is reproduced
    fused_stock = case()
    apply_sparse_attention(case.pipe, SparseAttentionConfig(pattern="dense"))
    assert all(isinstance(p.stock, FusedCogVideoXAttnProcessor2_0) for p in transformer.attn_processors.values())
    assert torch.equal(case(), fused_stock)
    remove_sparse_attention(case.pipe)
    transformer.unfuse_qkv_projections()
    remove_sparse_attention(case.pipe)
    assert torch.equal(case(), case.stock)
