"""LTX-Video (``LTXVideoTransformer3DModel``): ``transformer_blocks.{i}.attn1`` over the video tokens
(text enters through the cross-attention ``attn2``). RoPE is applied before the head split, on
``(B, S, H*D)``. The pipeline packs latents in frame-major raster order and passes the latent
``num_frames``, ``height`` and ``width``; classifier-free guidance is one batched call.
"""

from __future__ import annotations

import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from dit_sparse.layout import TokenLayout

from .adapter import TEXT_IN_CROSS_ATTENTION, Arguments, ModelAdapter, register_adapter
from .processor import SparseAttnProcessor


class LTXVideoSparseAttnProcessor(SparseAttnProcessor):
    """``LTXVideoAttnProcessor`` (self-attention) with sparse attention."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        hidden_states = self.attend_dispatched(query, key, value, attention_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def ltx_video_layout(transformer: LTXVideoTransformer3DModel, arguments: Arguments) -> TokenLayout:
    """Grid from the latent ``num_frames``, ``height``, ``width`` arguments and the patch sizes."""
    frames, height, width = (arguments(name) for name in ("num_frames", "height", "width"))
    if None in (frames, height, width):
        raise ValueError(
            "this LTXVideoTransformer3DModel call does not pass num_frames, height and width (e.g. it passes only "
            "video_coords), so its token grid is unknown; dit-sparse supports calls that pass them, as LTXPipeline does"
        )
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    layout = TokenLayout((frames // p_t, height // p, width // p))
    tokens = arguments("hidden_states").shape[1]
    if tokens != layout.video_len:
        raise ValueError(
            f"this LTXVideoTransformer3DModel call has {tokens} tokens but its grid {layout.grid} holds "
            f"{layout.video_len} (conditioning tokens appended?); dit-sparse supports one video grid per call"
        )
    return layout


LTX_VIDEO = register_adapter(ModelAdapter(
    transformer_class=LTXVideoTransformer3DModel,
    self_attention=(("transformer_blocks", "attn1"),),
    processor=LTXVideoSparseAttnProcessor,
    stock_processors=(LTXVideoAttnProcessor,),
    layout=ltx_video_layout,
    text=TEXT_IN_CROSS_ATTENTION,
    cross_attention=(("transformer_blocks", "attn2"),),
    context_parallel=True,
))
