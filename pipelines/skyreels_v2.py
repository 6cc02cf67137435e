"""SkyReels-V2 (``SkyReelsV2Transformer3DModel``): Wan 2.1's architecture, so Wan's layout and
sparse processor serve it. Self-attention is ``blocks.{i}.attn1`` over the video tokens only; the
text (and, for I2V, the image) enter through the cross-attention ``attn2``, left stock. Its stock
``SkyReelsV2AttnProcessor`` is ``WanAttnProcessor`` line for line on the self-attention branch,
with its own q/k/v projection helper.

The diffusion-forcing pipelines with ``causal_block_size > 1`` (the transformer's
``num_frame_per_block``) pass a block-causal attention mask to self-attention, which a token layout
does not describe: those calls run dense (with a warning).
"""

from __future__ import annotations

from diffusers import SkyReelsV2Transformer3DModel
from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor, _get_qkv_projections

from .adapter import TEXT_IN_CROSS_ATTENTION, ModelAdapter, register_adapter
from .wan import WanSparseAttnProcessor, wan_layout


class SkyReelsV2SparseAttnProcessor(WanSparseAttnProcessor):
    """``SkyReelsV2AttnProcessor`` (self-attention branch) with sparse attention."""

    qkv_projections = staticmethod(_get_qkv_projections)


SKYREELS_V2 = register_adapter(ModelAdapter(
    transformer_class=SkyReelsV2Transformer3DModel,
    self_attention=(("blocks", "attn1"),),
    processor=SkyReelsV2SparseAttnProcessor,
    stock_processors=(SkyReelsV2AttnProcessor,),
    layout=wan_layout,
    text=TEXT_IN_CROSS_ATTENTION,
    cross_attention=(("blocks", "attn2"),),
))
