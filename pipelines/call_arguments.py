"""Reading a forward call's arguments by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

Arguments = Callable[[str], Any]


class ForwardArguments:
    """Reads a forward call's arguments by name, whether passed by keyword or position.

    Example::

        >>> def forward(hidden_states, timestep, encoder_hidden_states=None): ...
        >>> read = ForwardArguments(forward).bind((1,), {"timestep": 2})
        >>> read("hidden_states"), read("timestep"), read("encoder_hidden_states")
        (1, 2, None)
    """

    def __init__(self, forward: Callable) -> None:
        self._positions = {name: i for i, name in enumerate(inspect.signature(forward).parameters)}

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> Arguments:
        def read(name: str) -> Any:
            if name in kwargs:
                return kwargs[name]
            position = self._positions.get(name)
            return args[position] if position is not None and position < len(args) else None

        return read


def timestep_value(timestep: Any) -> float | None:
    """One number for a call's ``timestep`` argument: its largest entry (Wan 2.2 TI2V passes a
    per-token timestep whose conditioning frame is 0).

    Example::

        >>> timestep_value(torch.tensor([[0.0, 750.0, 750.0]]))
        750.0
    """
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.max())
    return float(timestep)
