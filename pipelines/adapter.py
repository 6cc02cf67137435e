"""Model adapters: what dit-sparse knows about each supported diffusers transformer class (its
self-attention modules, the stock processor it reproduces, the token layout of a call), and the
registry that finds the adapter of a transformer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dit_sparse.layout import TokenLayout

from .call_arguments import Arguments


@dataclass(frozen=True)
class ModelAdapter:
    """One supported transformer class.

    Attributes:
        transformer_class: the diffusers transformer class.
        self_attention: ``(block list, attention attribute)`` pairs naming its self-attention
            modules in forward order, e.g. ``(("blocks", "attn1"),)`` for ``blocks.{i}.attn1``; the
            layer index of a module is its position in that order.
        processor: the sparse processor class installed on those modules.
        stock_processors: the processor classes it reproduces; any other processor found on a
            self-attention module (an IP-adapter, a custom one) is refused rather than dropped.
        layout: ``(transformer, arguments) -> TokenLayout`` for a forward call; ``arguments(name)``
            returns the call's argument ``name`` (``None`` when absent).
        context_parallel: whether it runs under diffusers' Ulysses context parallelism: the class's
            ``_cp_plan`` shards every self-attention sequence evenly (each rank holding its slice of
            the video and of any text), and ``layout`` reads the whole call's arguments.
    """

    transformer_class: type
    self_attention: tuple[tuple[str, str], ...]
    processor: type
    stock_processors: tuple[type, ...]
    layout: Callable[[torch.nn.Module, Arguments], TokenLayout]
    context_parallel: bool = False

    def self_attention_modules(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """``(qualified name, module)`` of every self-attention module, in layer order."""
        return [
            (f"{blocks}.{i}.{attention}", getattr(block, attention))
            for blocks, attention in self.self_attention
            for i, block in enumerate(getattr(transformer, blocks))
        ]

    def check_processors(self, processors: list[tuple[str, Any]]) -> None:
        """Refuse ``(module name, processor)`` pairs whose processor is not one this adapter reproduces."""
        expected = " or ".join(cls.__name__ for cls in self.stock_processors)
        for name, processor in processors:
            if type(processor) not in self.stock_processors:
                raise ValueError(
                    f"{name} runs {type(processor).__name__}, but dit-sparse reproduces only the stock "
                    f"{expected} of {self.transformer_class.__name__}; restore the stock processors (e.g. unload "
                    "the IP-adapter or custom processor) before applying sparse attention"
                )


_ADAPTERS: dict[type, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make ``adapter`` the one for its transformer class (and subclasses)."""
    _ADAPTERS[adapter.transformer_class] = adapter
    return adapter


def supported_transformers() -> list[str]:
    return sorted(cls.__name__ for cls in _ADAPTERS)


def context_parallel_transformers() -> list[str]:
    """The supported transformer classes that run under context parallelism."""
    return sorted(cls.__name__ for cls, adapter in _ADAPTERS.items() if adapter.context_parallel)


def adapter_for(transformer: torch.nn.Module) -> ModelAdapter:
    """The adapter of ``transformer``'s class; a ``ValueError`` naming the supported classes otherwise."""
    for cls in type(transformer).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    raise ValueError(
        f"dit-sparse does not support {type(transformer).__name__}; supported transformers: "
        f"{', '.join(supported_transformers())}"
    )
