"""What the studies share: the relative output error of a plan per group of heads, and where their
results go: ``<out>/results/<name>.json`` and ``<out>/img/<name>.png``, ``out`` given by ``--out``
(default ``docs``: run from the repository root, a study refreshes the figures and tables the docs
show).

Example::

    >>> head_groups(("local", "semantic", "local"))
    {'local': [0, 2], 'semantic': [1], 'mix': [0, 1, 2]}
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from dit_sparse import BlockSparsePlan, sparse_attention

DEFAULT_OUT = Path("docs")


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--out`` folder every study writes under."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for results/<study>.json and img/<study>.png (default: docs, the repository's "
                             "docs when run from its root)")


def relative_errors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsePlan,
    dense: torch.Tensor,
    groups: dict[str, list[int]],
) -> dict[str, float]:
    """``||sparse - dense|| / ||dense||`` over each group of heads, the sparse output from the torch
    backend."""
    out = sparse_attention(q, k, v, plan, backend="torch")
    return {
        name: float((out[:, :, heads] - dense[:, :, heads]).norm() / dense[:, :, heads].norm())
        for name, heads in groups.items()
    }


def head_groups(head_types: tuple[str, ...]) -> dict[str, list[int]]:
    """Heads of each type, in order of first appearance, and ``"mix"``: all of them."""
    groups = {kind: [h for h, t in enumerate(head_types) if t == kind] for kind in dict.fromkeys(head_types)}
    return {**groups, "mix": list(range(len(head_types)))}


def write_results(out: Path, name: str, results: dict) -> Path:
    """``<out>/results/<name>.json`` (folder created)."""
    path = Path(out) / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


def figure_path(out: Path, name: str) -> Path:
    """``<out>/img/<name>.png`` (folder created)."""
    path = Path(out) / "img" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def publish(out: Path, name: str, results: dict, plot: Callable[[dict, Path], None]) -> None:
    """Write ``<out>/results/<name>.json`` and the figure ``plot`` draws to ``<out>/img/<name>.png``."""
    print(f"\nwrote {write_results(out, name, results)}")
    path = figure_path(out, name)
    plot(results, path)
    print(f"wrote {path}")
