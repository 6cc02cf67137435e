"""CogVideoX 1.0 and 1.5 (``CogVideoXTransformer3DModel``): ``transformer_blocks.{i}.attn1`` over the
joint sequence, text first. The stock processor calls ``F.scaled_dot_product_attention`` directly on
``(B, H, S, D)``. Pipelines run classifier-free guidance as one batched call ``[uncond, cond]``
(context ``cond_uncond``); with per-context plans each batch element gets its own plan.

``fuse_qkv_projections()`` installs ``FusedCogVideoXAttnProcessor2_0`` on every layer: fuse before
applying dit-sparse (the fused processor is reproduced too); fusing afterwards replaces the sparse
processors, which the hook reports at the next call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from dit_sparse.layout import TokenLayout

from .adapter import TEXT_FIRST, Arguments, ModelAdapter, register_adapter
from .processor import SparseAttnProcessor


class CogVideoXSparseAttnProcessor(SparseAttnProcessor):
    """``CogVideoXAttnProcessor2_0`` (or its fused twin, whichever it replaced) with sparse attention."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if isinstance(self.stock, FusedCogVideoXAttnProcessor2_0):
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        def dense() -> torch.Tensor:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            return out.transpose(1, 2)

        query_bshd, key_bshd, value_bshd = (x.transpose(1, 2) for x in (query, key, value))
        hidden_states = self.attend(query_bshd, key_bshd, value_bshd, dense, attention_mask)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def cogvideox_layout(transformer: CogVideoXTransformer3DModel, arguments: Arguments) -> TokenLayout:
    """Grid from ``hidden_states (B, F, C, H, W)`` (1.5 also patches time by ``patch_size_t``), text first."""
    _, frames, _, height, width = arguments("hidden_states").shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t or 1
    text_len = arguments("encoder_hidden_states").shape[1]
    return TokenLayout((frames // p_t, height // p, width // p), text_len, text_first=True)


COGVIDEOX = register_adapter(ModelAdapter(
    transformer_class=CogVideoXTransformer3DModel,
    self_attention=(("transformer_blocks", "attn1"),),
    processor=CogVideoXSparseAttnProcessor,
    stock_processors=(CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0),
    layout=cogvideox_layout,
    text=TEXT_FIRST,
))
