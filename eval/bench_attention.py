"""Attention-only benchmark: dense SDPA against dit-sparse's block-sparse backends, in one run.

    python -m dit_sparse.eval.bench_attention                       # CPU: 8x32x32 grid, fp32
    python -m dit_sparse.eval.bench_attention --grid 8 32 32 --heads 4 --head-dim 64 --densities 0.1 0.15 0.5 1

Every timing is the median of ``--repeats`` runs after ``--warmup`` runs; speedups are ratios to
dense SDPA measured in the same process on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dit_sparse import BlockSparsePlan, TokenLayout, sparse_attention
from dit_sparse.eval.machine import describe_machine, machine_info


def band_block_mask(num_blocks: int, heads: int, density: float) -> torch.Tensor:
    """Each query block keeps the ``round(density * n)`` key blocks nearest to it in the tiled
    order: a local spatio-temporal window, the shape most video heads take."""
    keep = max(1, round(density * num_blocks))
    i = torch.arange(num_blocks)
    start = torch.clamp(i - keep // 2, 0, num_blocks - keep)
    j = torch.arange(num_blocks)
    mask = (j[None, :] >= start[:, None]) & (j[None, :] < (start + keep)[:, None])
    return mask.expand(heads, -1, -1)


def random_block_mask(num_blocks: int, heads: int, density: float, seed: int = 0) -> torch.Tensor:
    """Each query block keeps ``round(density * n)`` key blocks drawn at random (no locality)."""
    keep = max(1, round(density * num_blocks))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(heads, num_blocks, num_blocks, generator=g)
    idx = scores.topk(keep, dim=-1).indices
    return torch.zeros(heads, num_blocks, num_blocks, dtype=torch.bool).scatter_(-1, idx, True)


MASKS = {"band": band_block_mask, "random": random_block_mask}


def median_time(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronising the device around each run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    layout = TokenLayout(tuple(args.grid))
    seq = layout.seq_len
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, seq, args.heads, args.head_dim, generator=gen).to(device, dtype) for _ in range(3))
    order = layout.tile_order(tuple(args.tile))
    n_blocks = layout.num_blocks(args.block_size)

    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    dense_ms = median_time(lambda: F.scaled_dot_product_attention(qt, kt, vt), args.warmup, args.repeats, device)
    flops_dense = 4 * seq * seq * args.head_dim * args.heads
    rows = [{"backend": "sdpa (dense)", "density": 1.0, "ms": dense_ms, "speedup": 1.0,
             "tflops": flops_dense / dense_ms / 1e9}]
    for density in args.densities:
        mask = MASKS[args.mask](n_blocks, args.heads, density)
        plan = BlockSparsePlan.from_block_mask(mask, layout, args.block_size, q_order=order, kv_order=order).to(device)
        for backend in args.backends:
            ms = median_time(lambda: sparse_attention(q, k, v, plan, backend=backend), args.warmup, args.repeats, device)
            rows.append({
                "backend": backend, "density": plan.density(), "ms": ms, "speedup": dense_ms / ms,
                "tflops": flops_dense * plan.density() / ms / 1e9,
            })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| backend | density | ms | speedup vs dense SDPA | effective TFLOP/s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['density']:.3f} | {r['ms']:.1f} | {r['speedup']:.2f}x | {r['tflops']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=3, default=[8, 32, 32], metavar=("T", "H", "W"))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--tile", type=int, nargs=3, default=[1, 8, 8])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.5, 1.0])
    parser.add_argument("--mask", choices=sorted(MASKS), default="band")
    parser.add_argument("--backends", nargs="+", default=["torch"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        print("No GPU: timing the CPU path (PyTorch backend against dense SDPA).")
    rows = run(args)
    print(f"grid {tuple(args.grid)} = {TokenLayout(tuple(args.grid)).seq_len} tokens, {args.heads} heads, "
          f"head dim {args.head_dim}, blocks of {args.block_size}, {args.mask} mask; {describe_machine(machine_info(device))}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(device), "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
