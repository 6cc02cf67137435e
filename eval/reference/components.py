"""The reference model's architecture: the sizes of its VAE, text encoder and transformer, and the
untrained diffusers and transformers modules built from them.

Every call of the pipeline sees ``frames`` video frames of ``height x width`` pixels. The VAE
compresses 4x in time and space, and the transformer's patch is 1x1x1, so the default 29 frames
of 128x128 give an 8x32x32 latent: 8,192 video tokens per self-attention call, where attention's
``S^2`` cost dominates a CPU run.

Example::

    >>> sizes = ReferenceSizes()
    >>> sizes.video_tokens(frames=29, height=128, width=128)
    8192
    >>> vae = build_vae(sizes)
    >>> vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    (4, 4)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .vocabulary import build_tokenizer, vocabulary


@dataclass(frozen=True)
class ReferenceSizes:
    """Sizes of every component and of the default generation."""

    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 2, 2)
    latent_channels: int = 16
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 512
    frames: int = 29
    height: int = 128
    width: int = 128
    steps: int = 16
    guidance_scale: float = 1.0
    flow_shift: float = 3.0
    max_sequence_length: int = 32   # prompts are at most 18 tokens; Wan's 512 would bury them in zero padding

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_dim_mult) - 1)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a ``frames``-frame video: the VAE encodes the first frame alone, then
        groups of ``vae_scale``."""
        return (frames - 1) // self.vae_scale + 1

    def video_tokens(self, frames: int, height: int, width: int) -> int:
        """Video tokens per transformer call for a video of this size."""
        return self.latent_frames(frames) * (height // self.vae_scale) * (width // self.vae_scale)

    def to_dict(self) -> dict:
        return asdict(self)


def build_vae(sizes: ReferenceSizes):
    """An untrained ``AutoencoderKLWan`` compressing ``sizes.vae_scale`` x in time and space, with
    Wan 2.2's residual (average-down, duplicate-up) shortcuts: at this size they train several times
    faster on CPU than the plain Wan 2.1 blocks."""
    from diffusers import AutoencoderKLWan

    downsamples = len(sizes.vae_dim_mult) - 1
    return AutoencoderKLWan(
        base_dim=sizes.vae_base_dim, z_dim=sizes.latent_channels, dim_mult=list(sizes.vae_dim_mult),
        num_res_blocks=1, attn_scales=[], temperal_downsample=[True] * downsamples, is_residual=True,
        scale_factor_spatial=sizes.vae_scale, scale_factor_temporal=sizes.vae_scale,
    )


def build_text_encoder(sizes: ReferenceSizes):
    """An untrained ``UMT5EncoderModel`` over the reference vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(vocabulary()), d_model=sizes.text_dim, d_kv=sizes.text_dim // sizes.text_heads,
        d_ff=2 * sizes.text_dim, num_layers=sizes.text_layers, num_heads=sizes.text_heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config)


def build_transformer(sizes: ReferenceSizes):
    """An untrained ``WanTransformer3DModel`` with a 1x1x1 patch."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 1, 1), num_attention_heads=sizes.num_heads, attention_head_dim=sizes.head_dim,
        in_channels=sizes.latent_channels, out_channels=sizes.latent_channels, text_dim=sizes.text_dim,
        freq_dim=256, ffn_dim=sizes.ffn_dim, num_layers=sizes.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
    )


def build_scheduler(sizes: ReferenceSizes):
    """Wan's flow-matching UniPC scheduler with the reference model's shift."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=sizes.flow_shift)


def assemble_pipeline(vae, text_encoder, transformer, sizes: ReferenceSizes):
    """The ``WanPipeline`` of the given modules, the tokenizer and the scheduler."""
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=build_tokenizer(sizes.max_sequence_length), text_encoder=text_encoder,
                       vae=vae, transformer=transformer, scheduler=build_scheduler(sizes))
