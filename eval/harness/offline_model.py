"""The random offline model of the unit tests: a randomly initialised diffusers Wan 2.1
text-to-video pipeline, built in code, with fixed seeded prompt embeddings instead of a text encoder.
(The eval's and the demo's default is the trained reference model, :mod:`dit_sparse.eval.reference`.)

It is sized so that self-attention dominates a CPU run: at the default 29 frames of 128x128 pixels
the tiny VAE (4x spatial and temporal compression) gives an 8x32x32 latent, and with a 1x1x1 patch
every transformer call sees 8,192 video tokens; the transformer is narrow (2 heads of 64), so the
projections, feed-forward and the VAE stay small next to attention's ``S^2`` cost.

Its weights are random: fidelity figures measured on it test the sparse-attention mechanism
(how far the sparse output drifts from the dense one), not visual quality.

Example::

    >>> spec = OfflineWanSpec()
    >>> spec.video_tokens(frames=29, height=128, width=128)
    8192
    >>> pipe = build_offline_pipeline(OfflineWanSpec(num_layers=1))           # doctest: +SKIP
    >>> embeds = offline_prompt_embeds("a red fox in the snow", OfflineWanSpec(), seed=0)
    >>> tuple(embeds.shape)
    (1, 16, 64)
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OFFLINE_MODEL_NAME = "offline-wan (random weights)"


@dataclass(frozen=True)
class OfflineWanSpec:
    """Sizes of the offline Wan pipeline and its default generation settings."""

    num_layers: int = 4
    num_heads: int = 2
    head_dim: int = 64
    ffn_dim: int = 256
    text_dim: int = 64
    text_len: int = 16
    patch_size: tuple[int, int, int] = (1, 1, 1)
    vae_base_dim: int = 3
    vae_scale_spatial: int = 4
    vae_scale_temporal: int = 4
    frames: int = 29
    height: int = 128
    width: int = 128
    steps: int = 16
    guidance_scale: float = 1.0

    def video_tokens(self, frames: int, height: int, width: int) -> int:
        """Video tokens per transformer call for a video of this size."""
        latent_frames = (frames - 1) // self.vae_scale_temporal + 1
        pt, ph, pw = self.patch_size
        rows, cols = height // self.vae_scale_spatial // ph, width // self.vae_scale_spatial // pw
        return (latent_frames // pt) * rows * cols

    def to_dict(self) -> dict:
        return asdict(self)


def build_offline_pipeline(spec: OfflineWanSpec, seed: int = 0):
    """A ``WanPipeline`` with random weights drawn from ``seed`` (no text encoder: pass
    ``prompt_embeds`` from :func:`offline_prompt_embeds`)."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    downsamples = _log2(spec.vae_scale_spatial)
    temporal_downsamples = _log2(spec.vae_scale_temporal)
    if temporal_downsamples > downsamples:
        raise ValueError("the offline VAE cannot compress time more than space; raise vae_scale_spatial")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=spec.vae_base_dim,
            z_dim=16,
            dim_mult=[1] * (downsamples + 1),
            num_res_blocks=1,
            temperal_downsample=[False] * (downsamples - temporal_downsamples) + [True] * temporal_downsamples,
            scale_factor_spatial=spec.vae_scale_spatial,
            scale_factor_temporal=spec.vae_scale_temporal,
        )
        transformer = WanTransformer3DModel(
            patch_size=spec.patch_size,
            num_attention_heads=spec.num_heads,
            attention_head_dim=spec.head_dim,
            in_channels=16,
            out_channels=16,
            text_dim=spec.text_dim,
            freq_dim=256,
            ffn_dim=spec.ffn_dim,
            num_layers=spec.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)


def offline_prompt_embeds(prompt: str, spec: OfflineWanSpec, seed: int) -> torch.Tensor:
    """A fixed ``(1, text_len, text_dim)`` embedding for ``prompt``: the same text and seed always
    give the same tensor, different texts give different ones."""
    import torch

    generator = torch.Generator().manual_seed((zlib.crc32(prompt.encode()) + seed) % 2**63)
    return torch.randn(1, spec.text_len, spec.text_dim, generator=generator)


def _log2(factor: int) -> int:
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"VAE compression factors must be powers of two, got {factor}")
    return factor.bit_length() - 1
