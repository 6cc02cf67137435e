"""Recall and relative output error of every family and of auto, per head type, across densities.

    python -m dit_sparse.eval.studies.families                    # 16x32x32 grid, 2 heads per type, D=64
    python -m dit_sparse.eval.studies.families --grid 8 24 24 --heads-per-type 1 --densities 0.1 0.3

One calibration (the recall rule's, ``pattern="auto", min_recall=0.0``: block mass over every
family's orders, k-means and its split key clusters, sampled rows for the error estimate) serves
every family at every density, so all of them see the same measurement. Auto runs with the library defaults (per head the family with the lowest
estimated output error, and a fallback that may spend up to a tenth more on the worst heads), with
the fallback off (equal density), and with the earlier recall rule (min_recall 0.8: heads below it
stay dense, so it spends more). The error is ``||sparse - dense|| / ||dense||`` of the torch
backend's output against dense SDPA on the same inputs, over the heads of each type and over all
(the mix). Writes docs/results/study_families.json, docs/img/study_families.png and prints Markdown
tables.
"""

from __future__ import annotations

import argparse
import time


from dit_sparse import SparseAttentionConfig
from dit_sparse.planner import FAMILIES, calibrate, plan_from_calibration

from ..machine import describe_machine, machine_info
from ..synthetic import HEAD_TYPES, dense_attention, synthetic_attention
from .common import add_out_argument, head_groups, publish, relative_errors

DENSITIES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
# Row label -> the config fields besides the density.
PATTERNS = {
    **{name: {"pattern": name} for name in FAMILIES},
    "auto": {},
    "auto (no fallback)": {"max_error": float("inf")},
    "auto (min_recall 0.8)": {"min_recall": 0.8},
}


def run(grid: tuple[int, int, int], heads_per_type: int, head_dim: int, densities, seed: int) -> dict:
    data = synthetic_attention(grid, HEAD_TYPES * heads_per_type, head_dim=head_dim, seed=seed)
    groups = head_groups(data.head_types)
    start = time.perf_counter()
    dense = dense_attention(data.q, data.k, data.v)
    dense_seconds = time.perf_counter() - start
    calibration = calibrate(data.q, data.k, data.layout, SparseAttentionConfig(pattern="auto", min_recall=0.0), v=data.v)
    rows = []
    for density in densities:
        for pattern, fields in PATTERNS.items():
            config = SparseAttentionConfig(density=density, **fields)
            plan, report = plan_from_calibration(calibration, config)
            errors = relative_errors(data.q, data.k, data.v, plan, dense, groups)
            for group, heads in groups.items():
                rows.append({
                    "pattern": pattern, "budget": density, "heads": group, "error": errors[group],
                    "recall": float(report.recall[0, heads].mean()), "density": float(report.density[0, heads].mean()),
                    "families": [report.family[0][h] for h in heads],
                })
    return {
        "machine": describe_machine(machine_info()), "grid": grid, "head_dim": head_dim, "head_types": data.head_types, "seed": seed,
        "dense_seconds": dense_seconds, "calibration_seconds": calibration.seconds, "rows": rows,
    }


def markdown(results: dict) -> str:
    """One table per head group: error (recall) of each pattern at each budget density."""
    budgets = sorted({r["budget"] for r in results["rows"]})
    lines = []
    for group in dict.fromkeys(r["heads"] for r in results["rows"]):
        lines += [f"\n**{group}** — relative output error (recall)\n", "| pattern | " + " | ".join(f"{b:g}" for b in budgets) + " |"]
        lines.append("|---" * (len(budgets) + 1) + "|")
        for pattern in PATTERNS:
            cells = [
                f"{r['error']:.3f} ({r['recall']:.3f})"
                for b in budgets for r in results["rows"] if r["pattern"] == pattern and r["heads"] == group and r["budget"] == b
            ]
            lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["heads"] for r in results["rows"]))
    fig, axes = plt.subplots(2, len(groups), figsize=(3.2 * len(groups), 6), sharex=True)
    for col, group in enumerate(groups):
        for pattern in PATTERNS:
            rows = [r for r in results["rows"] if r["pattern"] == pattern and r["heads"] == group]
            x = [r["density"] for r in rows]
            style = {"linewidth": 2.5} if pattern == "auto" else {"linestyle": "--"} if pattern.startswith("auto") else {}
            axes[0, col].plot(x, [r["error"] for r in rows], marker="o", markersize=3, label=pattern, **style)
            axes[1, col].plot(x, [r["recall"] for r in rows], marker="o", markersize=3, label=pattern, **style)
        axes[0, col].set_title(group)
        axes[0, col].set_yscale("log")
        axes[1, col].set_xlabel("density (share of attention FLOPs)")
    axes[0, 0].set_ylabel("relative output error")
    axes[1, 0].set_ylabel("recall (attention mass kept)")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"Families on synthetic heads, grid {tuple(results['grid'])}, D={results['head_dim']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(16, 32, 32), metavar=("T", "H", "W"))
    parser.add_argument("--heads-per-type", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    parser.add_argument("--seed", type=int, default=0)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    results = run(tuple(args.grid), args.heads_per_type, args.head_dim, args.densities, args.seed)
    print(f"machine: {results['machine']}")
    print(f"dense SDPA {results['dense_seconds']:.2f} s, calibration (auto) {results['calibration_seconds']:.2f} s")
    print(markdown(results))
    publish(args.out, "study_families", results, plot)


if __name__ == "__main__":
    main()
