"""What calibration and planning cost per layer, in dense attention calls.

    python -m dit_sparse.eval.bench.planner                  # 8x32x32 = 8,192 tokens, 8 heads, D=64
    python -m dit_sparse.eval.bench.planner --grid 16 32 32 --heads 4 --repeats 2

For every pattern, build_plan and a dense SDPA call on the same synthetic q, k, v run alternately
``--repeats`` times; the table gives medians of wall time and of process CPU time (less disturbed
when other jobs share the machine) and their ratio to dense attention.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from dit_sparse import SparseAttentionConfig
from dit_sparse.config import PATTERNS
from dit_sparse.planner import build_plan

from ..machine import describe_machine, machine_info
from ..synthetic import HEAD_TYPES, dense_attention, synthetic_attention


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(8, 32, 32), metavar=("T", "H", "W"))
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    types = [HEAD_TYPES[h % len(HEAD_TYPES)] for h in range(args.heads)]
    data = synthetic_attention(tuple(args.grid), types, head_dim=args.head_dim, seed=0)
    print(f"machine: {describe_machine(machine_info())}")
    print(f"grid {tuple(args.grid)} = {data.layout.seq_len} tokens, {args.heads} heads, D={args.head_dim}, "
          f"density {args.density}, median of {args.repeats}\n")
    print("| pattern | build_plan wall s | dense wall s | wall ratio | build_plan CPU s | dense CPU s | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    dense = lambda: dense_attention(data.q, data.k, data.v)  # noqa: E731
    dense()
    build_plan(data.q, data.k, data.layout, SparseAttentionConfig(pattern="auto"), v=data.v)
    for pattern in PATTERNS:
        config = SparseAttentionConfig(pattern=pattern, density=args.density)
        plan_times, dense_times = [], []
        for _ in range(args.repeats):
            plan_times.append(timed(lambda: build_plan(data.q, data.k, data.layout, config, v=data.v)))
            dense_times.append(timed(dense))
        plan_wall, plan_cpu = (statistics.median(t[i] for t in plan_times) for i in (0, 1))
        dense_wall, dense_cpu = (statistics.median(t[i] for t in dense_times) for i in (0, 1))
        print(f"| {pattern} | {plan_wall:.2f} | {dense_wall:.2f} | {plan_wall / dense_wall:.2f} | "
              f"{plan_cpu:.2f} | {dense_cpu:.2f} | {plan_cpu / dense_cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
