"""Flux (``FluxTransformer2DModel``): dual-stream ``transformer_blocks.{i}.attn`` and single-stream
``single_transformer_blocks.{i}.attn``, both over the joint sequence, text first, RoPE over all of
it. Single-stream blocks get the joint sequence without the text length; the hook reads it from the
transformer call (``encoder_hidden_states``), and the image grid from ``img_ids``.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from dit_sparse.layout import TokenLayout

from .adapter import TEXT_FIRST, Arguments, ModelAdapter, register_adapter
from .processor import SparseAttnProcessor


class FluxSparseAttnProcessor(SparseAttnProcessor):
    """``FluxAttnProcessor`` with sparse attention (dual- and single-stream blocks)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.attend_dispatched(query, key, value, attention_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def flux_layout(transformer: FluxTransformer2DModel, arguments: Arguments) -> TokenLayout:
    """Image grid ``(1, rows, cols)`` from ``img_ids`` (raster ``[_, row, col]``), text first."""
    img_ids = arguments("img_ids")
    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    rows, cols = (int(v) + 1 for v in img_ids[-1, 1:].tolist())
    layout = TokenLayout((1, rows, cols), arguments("encoder_hidden_states").shape[1], text_first=True)
    tokens = arguments("hidden_states").shape[1]
    if tokens != layout.video_len:
        raise ValueError(
            f"this FluxTransformer2DModel call has {tokens} image tokens but img_ids describe a {rows}x{cols} grid "
            "(reference-image tokens appended, as in Kontext?); dit-sparse supports one image grid per call"
        )
    return layout


FLUX = register_adapter(ModelAdapter(
    transformer_class=FluxTransformer2DModel,
    self_attention=(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
    processor=FluxSparseAttnProcessor,
    stock_processors=(FluxAttnProcessor,),
    layout=flux_layout,
    text=TEXT_FIRST,
    context_parallel=True,
))
