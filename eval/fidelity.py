"""What the studies measure: dense reference outputs, relative output error, and where they ran."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dit_sparse import BlockSparsePlan, sparse_attention

DOCS = Path(__file__).resolve().parents[1] / "docs"


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense SDPA in diffusers' ``(B, S, H, D)`` layout."""
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


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


def machine() -> str:
    """One line naming the CPU, the threads torch uses and the versions."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def write_results(name: str, results: dict) -> Path:
    """``docs/results/<name>.json``."""
    path = DOCS / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


def figure_path(name: str) -> Path:
    """``docs/img/<name>.png`` (folder created)."""
    path = DOCS / "img" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def publish(name: str, results: dict, plot: Callable[[dict, Path], None]) -> None:
    """Write ``docs/results/<name>.json`` and the figure ``plot`` draws to ``docs/img/<name>.png``."""
    print(f"\nwrote {write_results(name, results)}")
    path = figure_path(name)
    plot(results, path)
    print(f"wrote {path}")
