"""What dit-sparse reads from a pipeline: its transformers and how many steps its run has."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from diffusers.utils.torch_utils import unwrap_module

from .adapter import supported_transformers

TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


def denoisers(pipe_or_transformer: Any) -> list[tuple[str, torch.nn.Module]]:
    """``(component name, transformer)`` of every transformer of a pipeline (``transformer``,
    ``transformer_2``), or ``[("transformer", it)]`` for a bare module. A transformer wrapped by
    ``torch.compile(...)`` stands for the module it compiles."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return [("transformer", unwrap_module(pipe_or_transformer))]
    components = getattr(pipe_or_transformer, "components", None)
    if not isinstance(components, dict):
        raise TypeError(
            f"expected a diffusers pipeline or transformer, got {type(pipe_or_transformer).__name__}"
        )
    found = [
        (name, unwrap_module(components[name])) for name in TRANSFORMER_COMPONENTS if components.get(name) is not None
    ]
    if not found:
        raise ValueError(
            f"{type(pipe_or_transformer).__name__} has no transformer component "
            f"({' or '.join(TRANSFORMER_COMPONENTS)}); "
            f"dit-sparse wraps diffusion transformers ({', '.join(supported_transformers())}): pass a pipeline "
            "built on one of them, or the transformer itself"
        )
    return found


def total_steps_of(pipe: Any) -> Callable[[], int | None]:
    """A function returning the run's length as ``pipe`` knows it at its first transformer call:
    its ``num_timesteps`` (every pipeline sets it before the denoising loop), else the length of its
    scheduler's timesteps; ``None`` when neither is known."""
    pipe_ref = weakref.ref(pipe)

    def total_steps() -> int | None:
        pipe = pipe_ref()
        if pipe is None:
            return None
        steps = getattr(pipe, "num_timesteps", None)
        if isinstance(steps, int):
            return steps
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        return None if timesteps is None else len(timesteps)

    return total_steps
