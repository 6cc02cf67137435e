"""Tiny randomly initialised diffusers pipelines of every supported family, built in code (no hub).

Each :class:`TinyCase` holds a pipeline and the inputs of one small generation; calling it runs the
generation with a fixed seed and returns the final latents (``output_type="latent"``), the most
sensitive thing to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    SkyReelsV2Pipeline,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

FAMILIES = ("wan", "wan_i2v", "wan22", "wan22_ti2v", "hunyuan_video", "cogvideox", "cogvideox_1_5", "ltx", "flux",
            "skyreels_v2")

WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32,
    freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
WAN_I2V_TEXT_TOKENS = 512  # WanAttnProcessor splits the image tokens off a 512-token text context


@dataclass
class TinyCase:
    """A pipeline and the inputs of one generation (``stock``: its output without dit-sparse)."""

    family: str
    pipe: Any
    inputs: dict[str, Any]
    steps: int
    stock: torch.Tensor | None = None

    def __call__(self, runner: Callable | None = None, **overrides: Any) -> torch.Tensor:
        """Run ``runner`` (default: the pipeline) on the case's inputs; returns the latents."""
        runner = self.pipe if runner is None else runner
        kwargs = {**self.inputs, "num_inference_steps": self.steps, "output_type": "latent",
                  "generator": torch.Generator().manual_seed(0), **overrides}
        return runner(**kwargs)[0]


def build(family: str) -> TinyCase:
    torch.manual_seed(0)
    return _BUILDERS[family]()


def _wan(pipeline_class=WanPipeline, two_experts: bool = False, **pipeline_kwargs) -> Any:
    transformer_kwargs = {**WAN_TRANSFORMER, **pipeline_kwargs.pop("transformer_kwargs", {})}
    transformer = WanTransformer3DModel(**transformer_kwargs)
    transformer_2 = WanTransformer3DModel(**transformer_kwargs) if two_experts else None
    pipe = pipeline_class(
        tokenizer=None, text_encoder=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer, transformer_2=transformer_2, boundary_ratio=0.875 if two_experts else None,
        **pipeline_kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wan_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _text(tokens: int, dim: int) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": torch.randn(1, tokens, dim), "negative_prompt_embeds": torch.randn(1, tokens, dim)}


def _image() -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))


def _build_wan() -> TinyCase:
    pipe = _wan(vae=None)
    return TinyCase("wan", pipe, {**_text(8, 32), "height": 64, "width": 64, "num_frames": 17}, steps=4)


def _build_wan_i2v() -> TinyCase:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=32, intermediate_size=8, patch_size=8))
    processor = CLIPImageProcessor(crop_size=32, size=32)
    pipe = _wan(WanImageToVideoPipeline, vae=_wan_vae(), image_encoder=encoder, image_processor=processor,
                transformer_kwargs={"in_channels": 36, "image_dim": 4, "added_kv_proj_dim": 24})
    inputs = {**_text(WAN_I2V_TEXT_TOKENS, 32), "image": _image(), "height": 64, "width": 64, "num_frames": 17}
    return TinyCase("wan_i2v", pipe, inputs, steps=4)


def _build_wan22() -> TinyCase:
    pipe = _wan(two_experts=True, vae=None)
    return TinyCase("wan22", pipe, {**_text(8, 32), "height": 64, "width": 64, "num_frames": 17}, steps=6)


def _build_wan22_ti2v() -> TinyCase:
    pipe = _wan(WanImageToVideoPipeline, vae=_wan_vae(), expand_timesteps=True)
    inputs = {**_text(8, 32), "image": _image(), "height": 64, "width": 64, "num_frames": 17}
    return TinyCase("wan22_ti2v", pipe, inputs, steps=4)


def _build_hunyuan_video() -> TinyCase:
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[:, 5:] = 0  # 5 real text tokens, 3 padding
    negative_mask = torch.ones(1, 8, dtype=torch.long)
    negative_mask[:, 2:] = 0
    text = _text(8, 16)
    inputs = {
        **text, "prompt_attention_mask": mask, "pooled_prompt_embeds": torch.randn(1, 8),
        "negative_prompt_attention_mask": negative_mask, "negative_pooled_prompt_embeds": torch.randn(1, 8),
        "true_cfg_scale": 2.0, "height": 32, "width": 32, "num_frames": 9,
    }
    return TinyCase("hunyuan_video", pipe, inputs, steps=3)


def _cogvideox(**transformer_kwargs) -> Any:
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=2, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=8, use_rotary_positional_embeddings=True, **transformer_kwargs,
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_cogvideox() -> TinyCase:
    pipe = _cogvideox(sample_width=4, sample_height=4)
    return TinyCase("cogvideox", pipe, {**_text(8, 32), "height": 64, "width": 64, "num_frames": 9}, steps=3)


def _build_cogvideox_1_5() -> TinyCase:
    pipe = _cogvideox(patch_size_t=2, sample_width=12, sample_height=12)  # 1.5's RoPE crops a grid of this size
    return TinyCase("cogvideox_1_5", pipe, {**_text(8, 32), "height": 96, "width": 96, "num_frames": 9}, steps=3)


def _build_ltx() -> TinyCase:
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=2, caption_channels=32)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    inputs = {**_text(8, 32), "prompt_attention_mask": torch.ones(1, 8),
              "negative_prompt_attention_mask": torch.ones(1, 8), "height": 128, "width": 128, "num_frames": 17}
    return TinyCase("ltx", pipe, inputs, steps=3)


def _build_flux() -> TinyCase:
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    inputs = {"prompt_embeds": torch.randn(1, 8, 32), "pooled_prompt_embeds": torch.randn(1, 32),
              "height": 128, "width": 128}
    return TinyCase("flux", pipe, inputs, steps=3)


def _build_skyreels_v2() -> TinyCase:
    transformer = SkyReelsV2Transformer3DModel(**WAN_TRANSFORMER)  # Wan 2.1's architecture
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    pipe = SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return TinyCase("skyreels_v2", pipe, {**_text(8, 32), "height": 64, "width": 64, "num_frames": 17}, steps=4)


_BUILDERS: dict[str, Callable[[], TinyCase]] = {
    "wan": _build_wan,
    "wan_i2v": _build_wan_i2v,
    "wan22": _build_wan22,
    "wan22_ti2v": _build_wan22_ti2v,
    "hunyuan_video": _build_hunyuan_video,
    "cogvideox": _build_cogvideox,
    "cogvideox_1_5": _build_cogvideox_1_5,
    "ltx": _build_ltx,
    "flux": _build_flux,
    "skyreels_v2": _build_skyreels_v2,
}
