"""diffusers' context parallelism (``transformer.enable_parallelism``) as dit-sparse sees it: the
Ulysses group a pipeline's transformers split their heads over, and the set-ups it refuses."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dit_sparse.ulysses import UlyssesGroup

from .adapter import ModelAdapter, context_parallel_transformers


def context_parallel_config(transformer: torch.nn.Module) -> Any:
    """The transformer's diffusers ``ContextParallelConfig`` (``None`` without context parallelism)."""
    return getattr(getattr(transformer, "_parallel_config", None), "context_parallel_config", None)


def ulysses_group(
    installs: list[tuple[str, torch.nn.Module, ModelAdapter, list[tuple[str, torch.nn.Module]]]],
) -> UlyssesGroup | None:
    """The Ulysses group of a pipeline's transformers (``None`` when none runs context-parallel).

    Args:
        installs: ``(component name, transformer, adapter, self-attention modules)`` of each.

    Raises ``ValueError`` naming the problem and what works, for ring or unified ring + Ulysses
    attention, uneven splits (``ulysses_anything``), heads that do not divide by the Ulysses degree,
    a model without a checked sequence split, or transformers of one pipeline split differently.
    """
    groups = {install[0]: _ulysses_group_of(*install) for install in installs}
    found = {name: group for name, group in groups.items() if group is not None}
    if not found:
        return None
    ranks = {name: (group.rank, tuple(dist.get_process_group_ranks(group.group))) for name, group in found.items()}
    if len(found) != len(groups) or len(set(ranks.values())) != 1:
        described = ", ".join(
            f"{name}: " + ("no context parallelism" if groups[name] is None else f"ranks {list(ranks[name][1])}")
            for name in groups
        )
        raise ValueError(
            f"the pipeline's transformers are split differently across processes ({described}); dit-sparse shares one "
            "controller between them: enable the same context parallelism (one ulysses_degree, one device mesh) on "
            "every transformer of the pipeline"
        )
    return next(iter(found.values()))


def _ulysses_group_of(
    name: str, transformer: torch.nn.Module, adapter: ModelAdapter, modules: list[tuple[str, torch.nn.Module]]
) -> UlyssesGroup | None:
    config = context_parallel_config(transformer)
    if config is None:
        return None
    cls = type(transformer).__name__
    if not adapter.context_parallel:
        raise ValueError(
            f"{name} ({cls}) runs with context parallelism, which dit-sparse supports for "
            f"{', '.join(context_parallel_transformers())} (transformers whose diffusers _cp_plan it follows); "
            f"diffusers ships no _cp_plan for {cls}, so how its sequence is split is unknown. Run {cls} without "
            "enable_parallelism"
        )
    if config.ring_degree > 1:
        kind = "unified ring + Ulysses attention" if config.ulysses_degree > 1 else "ring attention"
        raise ValueError(
            f"{name} ({cls}) runs {kind} (ring_degree={config.ring_degree}); dit-sparse supports Ulysses only. Ring "
            "attention splits every head's keys along the sequence across ranks, but a sparse plan permutes each "
            "head's tokens and picks its key blocks from the whole sequence, so it cannot be split along the sequence "
            "cheaply. Ulysses splits the heads, which plans are made of: use "
            f"ContextParallelConfig(ulysses_degree={config.ring_degree * config.ulysses_degree}) with ring_degree=1"
        )
    if config.ulysses_anything:
        raise ValueError(
            f"{name} ({cls}) runs Ulysses with ulysses_anything=True (uneven splits of heads and tokens); dit-sparse "
            "needs even splits: leave ulysses_anything off and use head and token counts divisible by ulysses_degree"
        )
    heads = {module.heads for _, module in modules}
    uneven = sorted(h for h in heads if h % config.ulysses_degree)
    if uneven:
        raise ValueError(
            f"{name} ({cls}) has {uneven[0]} attention heads, which do not split evenly over ulysses_degree="
            f"{config.ulysses_degree} ranks; use a ulysses_degree that divides {uneven[0]}"
        )
    return UlyssesGroup.of(config._ulysses_mesh.get_group())
