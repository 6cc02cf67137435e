"""Procedural text-to-video clips: simple objects whose colour, shape and motion a prompt names.

A clip is drawn from a seed alone (``clip_spec(seed)``), so a seed is a reproducible sample. Seeds
below :data:`HELDOUT_SEED_START` are for training; seeds from it on are the held-out split that
quality figures are measured on.

Example::

    >>> spec = clip_spec(3)
    >>> spec.prompt
    'a green square standing still on a dark blue background'
    >>> frames = render_clip(spec, frames=9, height=32, width=32)
    >>> tuple(frames.shape), float(frames.min()) >= 0.0, float(frames.max()) <= 1.0
    ((9, 32, 32, 3), True, True)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.15, 0.78, 0.22),
    "blue": (0.20, 0.38, 0.95),
    "yellow": (0.95, 0.88, 0.15),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.62, 0.22, 0.82),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.03, 0.03, 0.03),
    "dark blue": (0.05, 0.08, 0.30),
    "dark green": (0.04, 0.22, 0.09),
    "gray": (0.45, 0.45, 0.45),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "still", "growing")
MOTION_WORDS = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
                "still": "standing still", "growing": "growing"}

HELDOUT_SEED_START = 1_000_000
TWO_OBJECT_SHARE = 0.3
TRAVEL = 0.45           # distance a moving object covers over the clip, in frame widths
RADIUS = (0.11, 0.15)   # object half-size, in frame widths
GROWTH = (0.06, 0.2)    # half-size of a growing object at the first and the last frame


@dataclass(frozen=True)
class ObjectSpec:
    """One object: its words and where it starts (centre in ``[0, 1]`` frame coordinates)."""

    colour: str
    shape: str
    motion: str
    x: float
    y: float
    radius: float

    @property
    def words(self) -> str:
        return f"a {self.colour} {self.shape} {MOTION_WORDS[self.motion]}"

    def centre_and_radius(self, progress: float) -> tuple[float, float, float]:
        """Centre ``(x, y)`` and half-size at ``progress`` in ``[0, 1]`` through the clip."""
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(self.motion, (0, 0))
        radius = GROWTH[0] + (GROWTH[1] - GROWTH[0]) * progress if self.motion == "growing" else self.radius
        return self.x + dx * TRAVEL * progress, self.y + dy * TRAVEL * progress, radius


@dataclass(frozen=True)
class ClipSpec:
    """A clip: a background and one or two objects, drawn from ``seed``."""

    seed: int
    background: str
    objects: tuple[ObjectSpec, ...]

    @property
    def prompt(self) -> str:
        return " and ".join(obj.words for obj in self.objects) + f" on a {self.background} background"


def clip_spec(seed: int) -> ClipSpec:
    """The clip of ``seed``: background, objects (distinct colours), motions and start positions.

    Example::

        >>> clip_spec(0) == clip_spec(0), clip_spec(0) == clip_spec(1)
        (True, False)
    """
    rng = random.Random(seed)
    background = rng.choice(sorted(BACKGROUNDS))
    count = 2 if rng.random() < TWO_OBJECT_SHARE else 1
    colours = rng.sample(sorted(COLOURS), count)
    objects = []
    for index, colour in enumerate(colours):
        shape, motion = rng.choice(SHAPES), rng.choice(MOTIONS)
        radius = rng.uniform(*RADIUS)
        x, y = _start(rng, motion, radius, side=index if count == 2 else None)
        objects.append(ObjectSpec(colour, shape, motion, x, y, radius))
    return ClipSpec(seed, background, tuple(objects))


def _start(rng: random.Random, motion: str, radius: float, side: int | None) -> tuple[float, float]:
    """A start position that keeps the whole track inside the frame; with two objects (``side`` 0 or
    1) each keeps to its own half of the axis it does not move along."""
    margin = GROWTH[1] if motion == "growing" else radius
    low, high = margin, 1 - margin
    position = [rng.uniform(low, high), rng.uniform(low, high)]
    along = 1 if motion in ("up", "down") else 0
    if motion in ("left", "up"):
        position[along] = rng.uniform(low + TRAVEL, high)
    elif motion in ("right", "down"):
        position[along] = rng.uniform(low, high - TRAVEL)
    if side is not None:
        position[1 - along] = rng.uniform(side * 0.5 + margin, side * 0.5 + 0.5 - margin)
    return position[0], position[1]


def render_clip(spec: ClipSpec, frames: int, height: int, width: int) -> torch.Tensor:
    """The clip as ``(frames, height, width, 3)`` float32 in ``[0, 1]``, with anti-aliased edges."""
    import torch

    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / width
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    pixel = 1.0 / width
    video = torch.empty(frames, height, width, 3)
    video[:] = torch.tensor(BACKGROUNDS[spec.background])
    for f in range(frames):
        progress = f / max(frames - 1, 1)
        for obj in spec.objects:
            cx, cy, radius = obj.centre_and_radius(progress)
            cy *= height / width
            distance = _signed_distance(obj.shape, grid_x - cx, grid_y - cy, radius)
            cover = (0.5 - distance / pixel).clamp(0, 1)[..., None]
            video[f] = video[f] * (1 - cover) + cover * torch.tensor(COLOURS[obj.colour])
    return video


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: float) -> torch.Tensor:
    import torch

    if shape == "circle":
        return torch.sqrt(dx**2 + dy**2) - radius
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - radius * 0.9
    if shape == "triangle":  # equilateral, apex up (image y grows downwards), inradius 0.6 * radius
        normals = ((0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5))
        return torch.stack([nx * dx + ny * dy for nx, ny in normals]).amax(0) - 0.6 * radius
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
