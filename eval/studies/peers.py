"""Our families and auto against the peers' own rules on synthetic heads: density spent, recall and
relative output error at equal requested density.

    python -m dit_sparse.eval.studies.peers                          # reduced Wan 480p shape: 21 x 15 x 26
    python -m dit_sparse.eval.studies.peers --grid 21 30 52 --error-rows 1024   # full 480p, sampled rows

Heads: one per kind of :data:`PEER_BENCHMARK_TYPES` (local, frame, temporal, semantic, sink) per
``--heads-per-type``, 3-D RoPE, D=64. Every pattern is calibrated on the same q, k, v and planned at
each density; ``radial_paper`` has no density (its decay sets it), so it appears once, next to our
``radial`` (blocks of 128 and of 64) asked for the density it spent. ``svg1`` takes the density as its sparsity; ``svg2`` keeps
key clusters up to the density (and, once, its default top_p 0.9), on our fixed blocks and, as
"svg2 (cluster blocks)", on its own variable-size blocks (the clusters: exact attention of each
query over its cluster's kept key clusters, as SVG2's kernel computes it). The error of a head
is ``||sparse - dense|| / ||dense||`` of the torch backend's output, over all rows or, with
``--error-rows``, over that many sampled rows per head; a group's (a kind's, or the mix of all
heads) is the root mean square of its heads' errors (exact outputs of those rows: the full 480p
shape never needs an S x S matrix). Writes docs/results/study_peers.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import time

import torch

from dit_sparse import BlockSparsePlan, SparseAttentionConfig, sparse_attention
from dit_sparse.budget import Budget
from dit_sparse.families.peers import svg2_cluster_selection
from dit_sparse.output_error import Candidate, RowSample, estimate_errors
from dit_sparse.planner import FAMILIES, calibrate, plan_from_calibration

from ..machine import describe_machine, machine_info
from ..synthetic import PEER_BENCHMARK_TYPES, dense_attention, synthetic_attention
from .common import add_out_argument, write_results

DENSITIES = (0.10, 0.15, 0.25)
# Row label -> (calibration name, config fields besides the density).
PATTERNS = {
    **{name: ("ours", {"pattern": name}) for name in FAMILIES},
    "auto": ("ours", {}),
    "auto (no fallback)": ("ours", {"max_error": float("inf")}),
    "svg1": ("svg1", {"pattern": "svg1", "block_size": 128}),
    "svg2": ("svg2", {"pattern": "svg2", "kmeans_iters": 50}),
}


def run(grid, heads_per_type: int, head_dim: int, densities, error_rows: int | None, seed: int) -> dict:
    data = synthetic_attention(grid, PEER_BENCHMARK_TYPES * heads_per_type, head_dim=head_dim, seed=seed)
    kinds = data.head_types
    measure = _full_error(data) if error_rows is None else _sampled_error(data, error_rows, seed)
    start = time.perf_counter()
    calibrations = {
        "ours": calibrate(data.q, data.k, data.layout, SparseAttentionConfig(min_recall=0.0), v=data.v),
        "svg1": calibrate(data.q, data.k, data.layout, SparseAttentionConfig.preset("svg1"), v=data.v),
        "svg2": calibrate(data.q, data.k, data.layout, SparseAttentionConfig.preset("svg2")),
        "radial_paper": calibrate(data.q, data.k, data.layout, SparseAttentionConfig.preset("radial_paper")),
        "radial 128": calibrate(data.q, data.k, data.layout, SparseAttentionConfig(pattern="radial", block_size=128)),
    }
    calibration_seconds = time.perf_counter() - start
    rows = []

    def add(label: str, budget, calibration: str, config: SparseAttentionConfig) -> dict:
        plan, report = plan_from_calibration(calibrations[calibration], config)
        errors = measure(plan)
        row = {
            "pattern": label, "budget": budget, "density": plan.density(), "recall": float(report.recall.mean()),
            "error": errors["mix"], "errors": errors, "families": report.family[0],
        }
        rows.append(row)
        print(f"{label:22s} {budget!s:6s} density {row['density']:.3f} recall {row['recall']:.3f} error {row['error']:.3f}", flush=True)
        return row

    def add_svg2_exact(budget) -> None:
        density, errors = _svg2_cluster_exact(data, calibrations["svg2"].clustering, budget, error_rows, seed)
        label = "svg2 (cluster blocks)"
        rows.append({"pattern": label, "budget": "own" if budget.is_mass else budget.density, "density": density,
                     "recall": float("nan"), "error": errors["mix"], "errors": errors, "families": ["svg2"] * len(kinds)})
        print(f"{label:22s} density {density:.3f} error {errors['mix']:.3f}", flush=True)

    paper = add("radial_paper", "own", "radial_paper", SparseAttentionConfig.preset("radial_paper"))
    for calibration, block in (("radial 128", 128), ("ours", 64)):
        add(f"radial ({block} blocks)", "own", calibration,
            SparseAttentionConfig(pattern="radial", density=paper["density"], block_size=block))
    add("svg2 (top_p 0.9)", "own", "svg2", SparseAttentionConfig.preset("svg2"))
    add_svg2_exact(Budget(top_p=0.9))
    for density in densities:
        for label, (calibration, fields) in PATTERNS.items():
            add(label, density, calibration, SparseAttentionConfig(density=density, **fields))
        add_svg2_exact(Budget(density=density))
    return {
        "machine": describe_machine(machine_info()), "grid": grid, "head_dim": head_dim, "head_types": kinds, "seed": seed,
        "error_rows": error_rows, "calibration_seconds": calibration_seconds, "rows": rows,
    }


def _svg2_cluster_exact(data, clustering, budget: Budget, error_rows: int | None, seed: int) -> tuple[float, dict[str, float]]:
    """SVG2 on its own blocks (the clusters): the density of the kept cluster pairs and the exact
    output error of attending, from each query, the keys of the clusters its cluster keeps."""
    selection = svg2_cluster_selection(clustering, budget)[0]                          # [H, Cq, Ck]
    n = data.layout.video_len
    rows = torch.arange(n) if error_rows is None else RowSample.of(data.q, data.k, data.v, data.layout, error_rows, seed).rows
    scale = data.q.shape[-1] ** -0.5
    errors, densities = [], []
    for h in range(data.q.shape[2]):
        q_labels, k_labels = clustering.q_labels[0, h], clustering.k_labels[0, h]
        q_sizes = torch.bincount(q_labels, minlength=selection.shape[-2]).float()
        k_sizes = torch.bincount(k_labels, minlength=selection.shape[-1]).float()
        densities.append(float(q_sizes @ selection[h].float() @ k_sizes) / n**2)
        k, v = data.k[0, :, h], data.v[0, :, h]
        sq_err = sq_ref = 0.0
        for chunk in rows.split(1024):
            scores = data.q[0, chunk, h] @ k.T * scale
            dense = scores.softmax(-1) @ v
            kept = selection[h][q_labels[chunk]][:, k_labels]
            sparse = scores.masked_fill(~kept, float("-inf")).softmax(-1) @ v
            sq_err, sq_ref = sq_err + float((sparse - dense).pow(2).sum()), sq_ref + float(dense.pow(2).sum())
        errors.append((sq_err / sq_ref) ** 0.5)
    return sum(densities) / len(densities), _group_errors(torch.tensor(errors), data.head_types)


def _full_error(data):
    dense = dense_attention(data.q, data.k, data.v)

    def measure(plan: BlockSparsePlan) -> dict[str, float]:
        out = sparse_attention(data.q, data.k, data.v, plan, backend="torch")
        per_head = ((out - dense).pow(2).sum((0, 1, 3)) / dense.pow(2).sum((0, 1, 3))).sqrt()
        return _group_errors(per_head, data.head_types)

    return measure


def _sampled_error(data, count: int, seed: int):
    sample = RowSample.of(data.q, data.k, data.v, data.layout, count, seed)

    def measure(plan: BlockSparsePlan) -> dict[str, float]:
        orders = {"plan": (plan.order("q", 1), plan.order("kv", 1))}
        starts = {"plan": (plan.block_starts("q"), plan.block_starts("kv"))}
        error = estimate_errors(
            sample, (plan.block_size_q, plan.block_size_k), orders, [Candidate(plan.to_block_mask(), "plan")], 1, starts
        )
        return _group_errors(error[0, 0], data.head_types)

    return measure


def _group_errors(per_head: torch.Tensor, kinds) -> dict[str, float]:
    """Per kind and over all heads (``"mix"``): the root mean square of the heads' relative errors."""
    groups = {kind: [h for h, k in enumerate(kinds) if k == kind] for kind in dict.fromkeys(kinds)}
    groups["mix"] = list(range(len(kinds)))
    return {name: float(per_head[heads].pow(2).mean().sqrt()) for name, heads in groups.items()}


def markdown(results: dict) -> str:
    kinds = list(dict.fromkeys(results["head_types"]))
    lines = []
    for budget in dict.fromkeys(r["budget"] for r in results["rows"]):
        title = "the peers' own settings" if budget == "own" else f"requested density {budget}"
        lines += [f"\n**{title}**\n", "| pattern | density spent | recall | error (mix) | " + " | ".join(kinds) + " |",
                  "|---" * (4 + len(kinds)) + "|"]
        for r in (r for r in results["rows"] if r["budget"] == budget):
            recall = "–" if r["recall"] != r["recall"] else f"{r['recall']:.3f}"
            cells = [f"{r['density']:.3f}", recall, f"**{r['error']:.3f}**"] + [f"{r['errors'][k]:.3f}" for k in kinds]
            lines.append(f"| {r['pattern']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(21, 15, 26), metavar=("T", "H", "W"))
    parser.add_argument("--heads-per-type", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    parser.add_argument("--error-rows", type=int, default=None, help="sampled query rows per head (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    results = run(tuple(args.grid), args.heads_per_type, args.head_dim, args.densities, args.error_rows, args.seed)
    print(f"machine: {results['machine']}\ncalibration {results['calibration_seconds']:.1f} s")
    print(markdown(results))
    print(f"\nwrote {write_results(args.out, 'study_peers', results)}")


if __name__ == "__main__":
    main()
