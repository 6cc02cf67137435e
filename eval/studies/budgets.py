"""Budgets as the video grows: a fixed density, a fixed number of keys, and ``alpha * n**C`` keys.

    python -m dit_sparse.eval.studies.budgets                  # 1,024 to 32,768 tokens, one head per type
    python -m dit_sparse.eval.studies.budgets --grids 4 16 16 8 32 32 --head-dim 32

All budgets are matched at the smallest grid: ``KEYS`` keys per query there (two blocks of 64 at
1,024 tokens, density 0.125). The fixed density keeps that share of the keys at every length, the
fixed count keeps ``KEYS`` keys, and ``alpha * n**C`` takes ``alpha = KEYS / n0**C`` for C = 0.5 and
0.75 ("Attention is naturally n^C-sparse"). Each grid is calibrated once (pattern auto) and planned
under every budget with auto (min_recall 0); the error is the torch backend's output against dense
SDPA. Writes docs/results/study_budgets.json, docs/img/study_budgets.png and prints a Markdown
table.
"""

from __future__ import annotations

import argparse

from dit_sparse import SparseAttentionConfig
from dit_sparse.planner import calibrate, plan_from_calibration

from ..machine import describe_machine, machine_info
from ..synthetic import HEAD_TYPES, dense_attention, synthetic_attention
from .common import add_out_argument, head_groups, publish, relative_errors

GRIDS = ((4, 16, 16), (8, 16, 16), (8, 16, 32), (8, 32, 32), (16, 32, 32), (16, 32, 64))
KEYS = 128
EXPONENTS = (0.5, 0.75)


def budgets(video_len: int, smallest: int) -> dict[str, dict]:
    """Config budget arguments of each budget at ``video_len`` tokens (matched at ``smallest``)."""
    out = {
        f"density {KEYS / smallest:g}": {"density": KEYS / smallest},
        f"{KEYS} keys": {"density": min(1.0, KEYS / video_len)},
    }
    for exponent in EXPONENTS:
        out[f"alpha * n^{exponent:g}"] = {"alpha": KEYS / smallest**exponent, "exponent": exponent}
    return out


def run(grids, head_dim: int, seed: int) -> dict:
    smallest = min(t * h * w for t, h, w in grids)
    rows = []
    for grid in grids:
        data = synthetic_attention(grid, HEAD_TYPES, head_dim=head_dim, seed=seed)
        groups = head_groups(data.head_types)
        dense = dense_attention(data.q, data.k, data.v)
        calibration = calibrate(data.q, data.k, data.layout, SparseAttentionConfig(pattern="auto", min_recall=0.0), v=data.v)
        for name, budget in budgets(data.layout.video_len, smallest).items():
            plan, report = plan_from_calibration(calibration, SparseAttentionConfig(pattern="auto", min_recall=0.0, **budget))
            errors = relative_errors(data.q, data.k, data.v, plan, dense, groups)
            rows.append({
                "tokens": data.layout.seq_len, "grid": grid, "budget": name, "density": plan.density(),
                "keys_per_query": plan.density() * data.layout.seq_len, "recall": float(report.recall.mean()),
                "errors": errors,
            })
            print(f"{data.layout.seq_len:6d} {name:16s} density {plan.density():.4f} mix error {errors['mix']:.4f}", flush=True)
    return {"machine": describe_machine(machine_info()), "head_dim": head_dim, "seed": seed, "keys": KEYS, "rows": rows}


def markdown(results: dict) -> str:
    names = list(dict.fromkeys(r["budget"] for r in results["rows"]))
    lines = ["| tokens | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for tokens in dict.fromkeys(r["tokens"] for r in results["rows"]):
        cells = [
            f"{r['errors']['mix']:.3f} ({r['density']:.3f})"
            for name in names for r in results["rows"] if r["tokens"] == tokens and r["budget"] == name
        ]
        lines.append(f"| {tokens} | " + " | ".join(cells) + " |")
    return "mix relative output error (density)\n\n" + "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["budget"] for r in results["rows"]))
    groups = list(results["rows"][0]["errors"])
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(3.2 * (len(groups) + 1), 3.4))
    for name in names:
        rows = [r for r in results["rows"] if r["budget"] == name]
        tokens = [r["tokens"] for r in rows]
        for ax, group in zip(axes, groups):
            ax.plot(tokens, [r["errors"][group] for r in rows], marker="o", markersize=3, label=name)
        axes[-1].plot(tokens, [r["density"] for r in rows], marker="o", markersize=3, label=name)
    for ax, group in zip(axes, groups):
        ax.set_title(f"{group}: relative error", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
    axes[-1].set_title("density", fontsize=9)
    axes[-1].set_xscale("log", base=2)
    axes[-1].set_yscale("log")
    axes[-1].set_xlabel("tokens")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[g for grid in GRIDS for g in grid], metavar="T H W")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if len(args.grids) % 3:
        parser.error("--grids takes T H W triples")
    grids = [tuple(args.grids[i : i + 3]) for i in range(0, len(args.grids), 3)]
    results = run(grids, args.head_dim, args.seed)
    print(f"machine: {results['machine']}")
    print(markdown(results))
    publish(args.out, "study_budgets", results, plot)


if __name__ == "__main__":
    main()
