"""Wan 2.1 and 2.2 (``WanTransformer3DModel``): T2V, I2V, the two-expert A14B models and TI2V-5B.

Self-attention is ``blocks.{i}.attn1`` over the video tokens only (text and, for I2V, the image
enter through the cross-attention ``attn2``, left stock). RoPE is applied in the processor after the
QK norm, on interleaved pairs.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from dit_sparse.layout import TokenLayout

from .adapter import TEXT_IN_CROSS_ATTENTION, Arguments, ModelAdapter, register_adapter
from .processor import SparseAttnProcessor


class WanSparseAttnProcessor(SparseAttnProcessor):
    """``WanAttnProcessor`` (self-attention branch) with sparse attention."""

    qkv_projections = staticmethod(_get_qkv_projections)  # the stock module's own helper

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        query, key, value = self.qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        hidden_states = self.attend_dispatched(query, key, value, attention_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs (the stock processor defines it inline)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def wan_layout(transformer: WanTransformer3DModel, arguments: Arguments) -> TokenLayout:
    """Video grid from ``hidden_states (B, C, F, H, W)`` and ``patch_size``; no text in self-attention."""
    _, _, frames, height, width = arguments("hidden_states").shape
    p_t, p_h, p_w = transformer.config.patch_size
    return TokenLayout((frames // p_t, height // p_h, width // p_w))


WAN = register_adapter(ModelAdapter(
    transformer_class=WanTransformer3DModel,
    self_attention=(("blocks", "attn1"),),
    processor=WanSparseAttnProcessor,
    stock_processors=(WanAttnProcessor,),
    layout=wan_layout,
    text=TEXT_IN_CROSS_ATTENTION,
    cross_attention=(("blocks", "attn2"),),
    context_parallel=True,
))
