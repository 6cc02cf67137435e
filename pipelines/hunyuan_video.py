"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): dual-stream ``transformer_blocks.{i}.attn`` and
single-stream ``single_transformer_blocks.{i}.attn``, both over the joint sequence, video first and
text last. The prompt is padded: the transformer's ``encoder_attention_mask`` says how many text
tokens are real, which becomes ``TokenLayout.valid_text_len`` (the stock processors get it as a
boolean key mask). The text refiner's attention (``context_embedder.token_refiner``) stays stock.
"""

from __future__ import annotations

import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from dit_sparse.layout import TokenLayout

from .adapter import TEXT_LAST, Arguments, ModelAdapter, register_adapter
from .processor import SparseAttnProcessor


class HunyuanVideoSparseAttnProcessor(SparseAttnProcessor):
    """``HunyuanVideoAttnProcessor2_0`` with sparse attention (dual- and single-stream blocks)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if single_stream:
                text = encoder_hidden_states.shape[1]
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-text], image_rotary_emb, sequence_dim=1), query[:, -text:]], dim=1
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-text], image_rotary_emb, sequence_dim=1), key[:, -text:]], dim=1
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        hidden_states = self.attend_dispatched(query, key, value, attention_mask, mask_in_layout=True)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1] :],
            )
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def hunyuan_video_layout(transformer: HunyuanVideoTransformer3DModel, arguments: Arguments) -> TokenLayout:
    """Grid from ``hidden_states (B, C, F, H, W)``, text last, real text lengths from
    ``encoder_attention_mask`` (a prefix of ones per prompt, as the transformer reads it)."""
    _, _, frames, height, width = arguments("hidden_states").shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    text_len = arguments("encoder_hidden_states").shape[1]
    mask = arguments("encoder_attention_mask")
    valid = None
    if mask is not None:
        counts = tuple(mask.sum(dim=1, dtype=torch.int).tolist())
        valid = None if all(c == text_len for c in counts) else counts
    return TokenLayout((frames // p_t, height // p, width // p), text_len, text_first=False, valid_text_len=valid)


HUNYUAN_VIDEO = register_adapter(ModelAdapter(
    transformer_class=HunyuanVideoTransformer3DModel,
    self_attention=(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
    processor=HunyuanVideoSparseAttnProcessor,
    stock_processors=(HunyuanVideoAttnProcessor2_0,),
    layout=hunyuan_video_layout,
    text=TEXT_LAST,
))
