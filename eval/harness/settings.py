"""What every generation of an evaluation shares, and the dtype names the commands take. Nothing
here imports torch, so the command lines can check their arguments before loading anything.

Example::

    >>> GenerationSettings(steps=8, frames=9)
    GenerationSettings(steps=8, frames=9, height=None, width=None, guidance_scale=None, seed=0)
    >>> DTYPE_NAMES
    ('bfloat16', 'float16', 'float32')
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("bfloat16", "float16", "float32")
MAX_SEED = 2**63 - 1  # the largest seed the commands take (a non-negative int64)
MODEL_PROMPTS = ["A red fox trots through fresh snow at dawn, its breath steaming in the cold air."]  # for --model


@dataclass(frozen=True)
class GenerationSettings:
    """What every generation of a run shares. ``None`` leaves a value to the pipeline's default."""

    steps: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
