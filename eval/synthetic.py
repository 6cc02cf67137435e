"""Synthetic structured attention: q, k, v on a ``(T, H, W)`` grid whose heads behave like the heads
of video diffusion transformers.

Every head applies 3-D rotary position embedding (the head dimension split into frame, row and
column parts, as Wan and HunyuanVideo do) to content vectors. When a query's and a key's contents
share a direction ``u`` spread over many rotary frequencies, their score is a sum of cosines of the
position difference: largest at zero distance and falling off roughly with its logarithm, so the
attention weights decay like a power of the distance. The head types differ in what the content
holds (logits are ``q . k / sqrt(D)``):

- ``local``: ``u`` on the faster half of the frequencies of all three rotary parts, scaled so that
  a token's logit for its own position is ``CONTENT_SCALE**2``: attention to the spatio-temporal
  neighbourhood.
- ``temporal``: the same with ``u`` in the row and column parts only: attention to the same
  position (and its neighbourhood) in every frame.
- ``frame``: the same with ``u`` in the frame part only: attention to the whole of the query's own
  frame (and, less, the nearby frames), whatever the position.
- ``sink``: a local head plus sink tokens (one per ``TOKENS_PER_SINK`` video tokens, anywhere in
  the video) whose keys align with every query along the slowest frequencies, which barely turn
  (logit ``2 * SINK_SCALE**2`` on top).
- ``semantic``: the video is cut into regions around seeds that drift across the frames (content
  that moves, about ``TOKENS_PER_REGION`` tokens a region); a token's content is its region's
  embedding in the slow frequencies (logit ``REGION_SCALE**2`` within a region) plus a weak local
  term, so it attends to its own region in every frame.

Values are a smooth random field over the grid plus noise (neighbouring tokens carry similar
values, as in image latents); semantic heads add their region's embedding. Text tokens, when
asked for, get unstructured q, k, v. Everything is seeded; the constants below set the benchmark's
difficulty (at density 0.15 the adaptive family keeps about 0.85-0.95 of a head's attention mass).

Example::

    >>> data = synthetic_attention((4, 16, 16), ["local", "semantic"], head_dim=32, seed=0)
    >>> data.q.shape, data.layout.seq_len, data.head_types
    (torch.Size([1, 1024, 2, 32]), 1024, ('local', 'semantic'))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_sparse import TokenLayout

HEAD_TYPES = ("local", "temporal", "sink", "semantic")
# The five kinds of the peer benchmark (eval.studies.peers): HEAD_TYPES and whole-frame heads.
PEER_BENCHMARK_TYPES = ("local", "frame", "temporal", "semantic", "sink")
KINDS = (*HEAD_TYPES, "frame")
ROPE_BASE = 10000.0
CONTENT_SCALE = {"local": 5.5, "temporal": 5.5, "frame": 5.5, "sink": 5.5, "semantic": 1.0}
SINK_SCALE = 2.3
REGION_SCALE = 3.0
NOISE = 0.3
FAST, SLOW = (0.0, 0.5), (0.75, 1.0)
TOKENS_PER_SINK = 1024
TOKENS_PER_REGION = 512


@dataclass
class SyntheticAttention:
    """One attention call's inputs: ``q, k, v`` are ``(1, S, H, D)`` fp32 in diffusers' layout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: TokenLayout
    head_types: tuple[str, ...]


def synthetic_attention(
    grid: tuple[int, int, int],
    head_types: Sequence[str],
    head_dim: int = 64,
    text_len: int = 0,
    text_first: bool = False,
    seed: int = 0,
) -> SyntheticAttention:
    """q, k, v for one head of each entry of ``head_types`` (see the module docstring).

    Args:
        grid: ``(T, H, W)`` video grid in tokens (any size; ``T = 1`` is an image).
        head_types: one of :data:`KINDS` per head.
        head_dim: D, a multiple of 8.
        text_len, text_first: text tokens in the sequence and their side.
        seed: seeds everything.
    """
    unknown = sorted(set(head_types) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown head types {unknown}; choose from {', '.join(KINDS)}")
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 (three even rotary parts), got {head_dim}")
    layout = TokenLayout(grid, text_len, text_first)
    g = torch.Generator().manual_seed(seed)
    coords = layout.video_coords()
    rope = _Rotary(coords, head_dim)
    field = _smooth_field(coords, grid, head_dim, g)
    heads = [_head(kind, coords, grid, rope, field, g) for kind in head_types]
    q, k, v = (torch.stack([h[i] for h in heads], dim=1) for i in range(3))
    if text_len:
        text = [torch.randn(text_len, len(heads), head_dim, generator=g) for _ in range(3)]
        q, k, v = (
            torch.cat([t, x] if text_first else [x, t]) for t, x in zip(text, (q, k, v))
        )
    return SyntheticAttention(q[None], k[None], v[None], layout, tuple(head_types))


class _Rotary:
    """3-D rotary embedding: the head dimension split into frame, row and column parts."""

    def __init__(self, coords: torch.Tensor, dim: int) -> None:
        t_dim = 2 * (dim // 8)
        h_dim = 2 * ((dim - t_dim) // 4)
        self.parts = (t_dim, h_dim, dim - t_dim - h_dim)
        angles = []
        for axis, part in enumerate(self.parts):
            freqs = ROPE_BASE ** (-torch.arange(0, part, 2, dtype=torch.float64) / part)
            angles.append(coords[:, axis, None].double() * freqs)
        angle = torch.cat(angles, dim=1)
        self.cos, self.sin = angle.cos().float(), angle.sin().float()

    def pair_mask(self, axes: Sequence[int], band: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """``[D/2]`` rotary pairs of the given axes whose rank from the fastest frequency (the centre
        of the pair's share of its part) lies in ``band``."""
        mask = []
        for axis, part in enumerate(self.parts):
            rank = (torch.arange(part // 2) + 0.5) / (part // 2)
            mask.append((rank >= band[0]) & (rank < band[1]) & (axis in axes))
        return torch.cat(mask)

    def __call__(self, content: torch.Tensor) -> torch.Tensor:
        x = content.view(content.shape[0], -1, 2)
        real = x[..., 0] * self.cos - x[..., 1] * self.sin
        imag = x[..., 0] * self.sin + x[..., 1] * self.cos
        return torch.stack([real, imag], dim=-1).flatten(1)


def _direction(pairs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random unit vector ``[D]`` living on the given rotary pairs."""
    u = torch.randn(pairs.numel(), 2, generator=g) * pairs[:, None]
    return (u / u.norm()).flatten()


def _head(kind: str, coords: torch.Tensor, grid, rope: _Rotary, field: torch.Tensor, g: torch.Generator):
    n, dim = coords.shape[0], rope.cos.shape[1] * 2
    axes = {"temporal": (1, 2), "frame": (0,)}.get(kind, (0, 1, 2))
    u = _direction(rope.pair_mask(axes, FAST), g) * CONTENT_SCALE[kind] * dim**0.25
    q_content = u + NOISE * torch.randn(n, dim, generator=g)
    k_content = u + NOISE * torch.randn(n, dim, generator=g)
    v = field + NOISE * torch.randn(n, dim, generator=g)
    slow = rope.pair_mask((0, 1, 2), SLOW)
    if kind == "sink":
        s = _direction(slow, g) * SINK_SCALE * dim**0.25
        sinks = torch.randperm(n, generator=g)[: max(1, n // TOKENS_PER_SINK)]
        q_content = q_content + s
        k_content[sinks] += s * 2
    if kind == "semantic":
        region = _moving_regions(coords, grid, g)
        embed = torch.stack([_direction(slow, g) for _ in range(int(region.max()) + 1)]) * REGION_SCALE * dim**0.25
        q_content = q_content + embed[region]
        k_content = k_content + embed[region]
        v = v + embed[region] / dim**0.25
    return rope(q_content), rope(k_content), v


def _moving_regions(coords: torch.Tensor, grid, g: torch.Generator) -> torch.Tensor:
    """``[N]`` region of each token: the nearest of seeds that drift linearly across the frames."""
    frames, height, width = grid
    count = max(2, round(coords.shape[0] / TOKENS_PER_REGION))
    start = torch.rand(count, 2, generator=g) * torch.tensor([height, width])
    velocity = (torch.rand(count, 2, generator=g) - 0.5) * torch.tensor([height, width]) / max(frames, 1)
    seeds = start[None] + velocity[None] * torch.arange(frames)[:, None, None]
    where = seeds[coords[:, 0]]
    offset = coords[:, None, 1:].float() - where
    return (offset * offset).sum(-1).argmin(-1)


def _smooth_field(coords: torch.Tensor, grid, dim: int, g: torch.Generator, modes: int = 8) -> torch.Tensor:
    """``[N, D]`` a sum of a few random low-frequency waves over the grid, unit variance per channel."""
    extent = torch.tensor(grid, dtype=torch.float32)
    freqs = torch.randn(modes, 3, generator=g) / extent
    phase = 2 * math.pi * torch.rand(modes, generator=g)
    waves = torch.cos(2 * math.pi * coords.float() @ freqs.T + phase)
    mix = torch.randn(modes, dim, generator=g) * (2 / modes) ** 0.5
    return waves @ mix


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense SDPA in diffusers' ``(B, S, H, D)`` layout: the reference the benchmarks and studies
    measure sparse attention against."""
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
