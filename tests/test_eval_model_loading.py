"""The path real checkpoints take: a pipeline saved with save_pretrained, loaded back by the eval's
loader, driven with string prompts through its own tokenizer and text encoder."""

import json

import numpy as np
import pytest
import torch

from dit_sparse.eval.cli import main
from dit_sparse.eval.harness.models import GenerationSettings, load_model, output_frames
from dit_sparse.eval.results import RANDOM_WEIGHTS_NOTE
from dit_sparse.eval.harness.video_size import VideoSize

WORDS = ["[PAD]", "[UNK]", "</s>", "a", "red", "fox", "in", "the", "snow", "cat", "on", "grass"]


def save_tiny_wan_with_text_encoder(folder) -> None:
    """A tiny Wan text-to-video pipeline with a word-level tokenizer and a random UMT5 encoder."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="</s>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.save_pretrained(folder)


@pytest.fixture(scope="module")
def saved_tiny_wan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-wan")
    save_tiny_wan_with_text_encoder(folder)
    return folder


def test_a_saved_pipeline_loads_and_generates_from_string_prompts(saved_tiny_wan):
    model = load_model(str(saved_tiny_wan), torch.device("cpu"), torch.float32)
    assert not model.random_weights and model.offline_spec is None and model.makes_video
    assert (model.defaults.steps, model.defaults.frames, model.defaults.height, model.defaults.width) == (
        50, 81, 480, 832)                                  # WanPipeline.__call__'s own defaults
    settings = GenerationSettings(steps=2, frames=5, height=16, width=16, guidance_scale=1.0)
    model.pipe.set_progress_bar_config(disable=True)
    first = output_frames(model.pipe(**model.call_kwargs("a red fox in the snow", settings)))
    again = output_frames(model.pipe(**model.call_kwargs("a red fox in the snow", settings)))
    other = output_frames(model.pipe(**model.call_kwargs("a cat on the grass", settings)))
    assert first.shape == (5, 16, 16, 3) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    np.testing.assert_array_equal(first, again)            # same prompt and seed: same video
    assert not np.array_equal(first, other)                # the prompt reaches the model


def test_sizes_the_pipeline_would_round_are_refused_with_the_nearest_valid_ones(saved_tiny_wan):
    model = load_model(str(saved_tiny_wan), torch.device("cpu"), torch.float32)   # VAE 4x in time, 8x in space; patch 2
    model.check_video_size(GenerationSettings(frames=9, height=32, width=48))
    with pytest.raises(ValueError, match=r"takes 4k\+1 frames \(1, 5, 9, ...\); got 10: use 9 or 13"):
        model.check_video_size(GenerationSettings(frames=10))
    with pytest.raises(ValueError, match="width that is a multiple of 16 .*; got 40: use 32 or 48"):
        model.check_video_size(GenerationSettings(height=32, width=40))
    with pytest.raises(ValueError, match="height that is a multiple of 16 .*; got 8: use 16$"):
        model.check_video_size(GenerationSettings(height=8))


def test_the_size_rules_read_before_loading_are_the_loaded_pipelines(saved_tiny_wan):
    model = load_model(str(saved_tiny_wan), torch.device("cpu"), torch.float32)
    before = VideoSize.from_folder(saved_tiny_wan, "tiny")
    assert before == VideoSize.from_pipeline(model.pipe, "tiny")
    assert (before.frame_step, before.side_multiple) == (model.pipe.vae_scale_factor_temporal, (16, 16))


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"could not load .* \(a local directory\).*save_pretrained"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)


def test_frames_on_an_image_pipeline_are_refused():
    class ImagePipeline:
        def __call__(self, prompt, num_inference_steps=28, height=None, width=None, output_type="pil", generator=None):
            raise AssertionError("never called")

    from dit_sparse.eval.harness.models import EvalModel

    model = EvalModel(ImagePipeline(), "an-image-model", random_weights=False)
    with pytest.raises(ValueError, match="makes images; --frames applies to video pipelines only"):
        model.call_kwargs("a fox", GenerationSettings(frames=9))


def test_the_cli_runs_unchanged_on_a_saved_pipeline(saved_tiny_wan, tmp_path):
    out = tmp_path / "eval-out"
    code = main(["--model", str(saved_tiny_wan), "--prompts", "a red fox in the snow",
                 "--frames", "9", "--height", "32", "--width", "32", "--steps", "3", "--guidance-scale", "1",
                 "--patterns", "adaptive", "--dense-steps", "1", "--densities", "0.5", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == {"name": str(saved_tiny_wan), "random_weights": False, "offline_spec": None,
                                "self_attention_layers": {"transformer": ["blocks.0.attn1", "blocks.1.attn1"]}}
    assert RANDOM_WEIGHTS_NOTE not in results["notes"] and results["settings"]["frames_shape"] == [9, 32, 32, 3]
    assert results["configs"][0]["dense_steps"] == 1 and results["configs"][0]["speedup"] > 0
