"""Model adapters: what dit-sparse knows about each supported diffusers transformer class (its
self-attention modules in layer order, the stock processors it reproduces, the token layout of a
call, where the text is, its cross-attention modules), and the registry that finds the adapter of a
transformer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dit_sparse.layout import TokenLayout

from .call_arguments import Arguments


TEXT_FIRST, TEXT_LAST, TEXT_IN_CROSS_ATTENTION = "first", "last", "cross-attention"


@dataclass(frozen=True)
class ModelAdapter:
    """One supported transformer class: the one place that says which of its attention modules
    dit-sparse makes sparse and how they are numbered. The hooks, the plan files, the eval's
    attention timer and the demo's mask pictures all take their layers from here.

    Attributes:
        transformer_class: the diffusers transformer class (pipelines hold it as ``transformer`` and,
            for Wan 2.2's second expert, ``transformer_2``).
        self_attention: ``(block list, attention attribute)`` pairs naming its self-attention
            modules in forward order, e.g. ``(("blocks", "attn1"),)`` for ``blocks.{i}.attn1``; the
            layer index of a module is its position in that order.
        processor: the sparse processor class installed on those modules.
        stock_processors: the processor classes it reproduces; any other processor found on a
            self-attention module (an IP-adapter, a custom one) is refused rather than dropped.
        layout: ``(transformer, arguments) -> TokenLayout`` for a forward call; ``arguments(name)``
            returns the call's argument ``name`` (``None`` when absent).
        text: where the prompt's tokens are in the self-attention sequence: ``"first"`` or
            ``"last"`` (a joint sequence), or ``"cross-attention"`` (not in it: the video attends
            the text through ``cross_attention``).
        cross_attention: ``(block list, attention attribute)`` pairs naming its cross-attention
            modules (left stock). Attention modules in neither list (HunyuanVideo's text refiner)
            are neither.
        context_parallel: whether it runs under diffusers' Ulysses context parallelism: the class's
            ``_cp_plan`` shards every self-attention sequence evenly (each rank holding its slice of
            the video and of any text), and ``layout`` reads the whole call's arguments.

    Example::

        >>> from dit_sparse.pipelines import adapter_for
        >>> adapter = adapter_for(pipe.transformer)  # doctest: +SKIP
        >>> adapter.self_attention_layers(pipe.transformer)  # doctest: +SKIP
        ['transformer_blocks.0.attn1', 'transformer_blocks.1.attn1']
    """

    transformer_class: type
    self_attention: tuple[tuple[str, str], ...]
    processor: type
    stock_processors: tuple[type, ...]
    layout: Callable[[torch.nn.Module, Arguments], TokenLayout]
    text: str
    cross_attention: tuple[tuple[str, str], ...] = ()
    context_parallel: bool = False

    def __post_init__(self) -> None:
        placements = (TEXT_FIRST, TEXT_LAST, TEXT_IN_CROSS_ATTENTION)
        if self.text not in placements:
            raise ValueError(f"text must be one of {placements}, got {self.text!r}")

    def self_attention_modules(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """``(qualified name, module)`` of every self-attention module, in layer order: layer ``i``
        is the ``i``-th entry."""
        return _modules(transformer, self.self_attention)

    def self_attention_layers(self, transformer: torch.nn.Module) -> list[str]:
        """The qualified name of each self-attention layer, in layer order."""
        return [name for name, _ in self.self_attention_modules(transformer)]

    def cross_attention_modules(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """``(qualified name, module)`` of every cross-attention module, in model order."""
        return _modules(transformer, self.cross_attention)

    def describe(self, transformer: torch.nn.Module) -> dict[str, Any]:
        """What a plan file records about ``transformer``: its class, layer count and heads."""
        modules = self.self_attention_modules(transformer)
        return {"class": type(transformer).__name__, "self_attention_layers": len(modules),
                "heads": modules[0][1].heads}

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


def _modules(transformer: torch.nn.Module, where: tuple[tuple[str, str], ...]) -> list[tuple[str, torch.nn.Module]]:
    return [
        (f"{blocks}.{i}.{attention}", getattr(block, attention))
        for blocks, attention in where
        for i, block in enumerate(getattr(transformer, blocks))
    ]


_ADAPTERS: dict[type, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make ``adapter`` the one for its transformer class (and subclasses)."""
    _ADAPTERS[adapter.transformer_class] = adapter
    return adapter


def registered_adapters() -> list[ModelAdapter]:
    """Every registered adapter, by transformer class name."""
    return sorted(_ADAPTERS.values(), key=lambda adapter: adapter.transformer_class.__name__)


def supported_transformers() -> list[str]:
    return [adapter.transformer_class.__name__ for adapter in registered_adapters()]


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
