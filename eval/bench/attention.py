"""Attention-only benchmark: dense SDPA against dit-sparse's block-sparse backends, in one run.

    python -m dit_sparse.eval.bench.attention                       # CPU: 8x32x32 grid, fp32
    python -m dit_sparse.eval.bench.attention --grid 8 32 32 --heads 4 --head-dim 64 --densities 0.1 0.15 0.5 1
    python -m dit_sparse.eval.bench.attention --preset wan480p      # GPU: the kernels at Wan2.1 480p
    python -m dit_sparse.eval.bench.attention --preset hunyuan720p  # GPU: ... at HunyuanVideo 720p

On a GPU the ``wan480p`` and ``hunyuan720p`` presets (the default there is ``wan480p``) time, on one
plan per density: dense SDPA (the flash backend, and the backend torch picks itself, cuDNN on Hopper;
ratios are to the faster of the two), compiled FlexAttention with the plan's BlockMask and the
Triton kernel (the ``flex`` and ``triton`` backends on tensors already in plan order), the ``triton``
backend end to end (with the token gathers), and block-mass calibration of the layer against one
dense attention; then they check the kernel targets. Without a GPU every preset runs the CPU comparison (``--preset cpu``):
dense SDPA, each ``--backends`` entry through ``sparse_attention`` (token gathers included) and, for
``torch`` and ``flex``, its kernel alone on tensors already in plan order. ``flex`` on the CPU is
compiled FlexAttention (past its eager bound): its first call, the compile, is reported apart. The
CPU timings are taken in turns (one call of each per round), and the run prints the CPU that other
processes used meanwhile, and the CPU targets.

Every timing is the median of ``--repeats`` runs after ``--warmup`` runs (CUDA events on a GPU);
speedups are ratios to dense SDPA measured in the same process on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dit_sparse import BlockSparsePlan, TokenLayout, sparse_attention
from dit_sparse.eval.machine import OtherCpuUse, describe_machine, machine_info


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

PRESETS = {
    "cpu": {"grid": [8, 32, 32], "text_len": 0, "heads": 4, "head_dim": 64, "block_size": 64, "tile": [1, 8, 8],
            "densities": [0.1, 0.15, 0.2, 0.5, 1.0]},
    # Wan2.1-1.3B at 480p, 81 frames: 21 x 30 x 52 = 32,760 tokens, 12 heads of 128
    "wan480p": {"grid": [21, 30, 52], "text_len": 0, "heads": 12, "head_dim": 128, "block_size": 128,
                "tile": [2, 8, 8], "densities": [1.0, 0.3, 0.15, 0.1]},
    # HunyuanVideo at 720p, 129 frames: 33 x 45 x 80 = 118,800 video tokens + 256 text, 24 heads of 128
    "hunyuan720p": {"grid": [33, 45, 80], "text_len": 256, "heads": 24, "head_dim": 128, "block_size": 128,
                    "tile": [2, 8, 8], "densities": [1.0, 0.3, 0.15, 0.1]},
}
GPU_PRESETS = ("wan480p", "hunyuan720p")
TARGETS = {"dense_throughput": 0.8, "speedup_vs_sdpa": 5.0, "speedup_vs_flex": 1.15, "target_density": 0.15,
           "calibration_cost": 2.0}


def median_time(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> float:
    """Median time of ``fn`` in milliseconds: CUDA events around each run on a GPU, wall time
    elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The layout and random ``(1, S, H, D)`` q, k, v of the benchmark's shape."""
    layout = TokenLayout(tuple(args.grid), args.text_len)
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = [torch.randn(1, layout.seq_len, args.heads, args.head_dim, generator=gen).to(device, dtype) for _ in range(3)]
    return layout, *qkv


def make_plan(args: argparse.Namespace, layout: TokenLayout, density: float, device: torch.device) -> BlockSparsePlan:
    """The ``--mask`` pattern at ``density`` over the ``--tile`` order (queries and keys alike)."""
    order = layout.tile_order(tuple(args.tile))
    mask = MASKS[args.mask](layout.num_blocks(args.block_size), args.heads, density)
    return BlockSparsePlan.from_block_mask(mask, layout, args.block_size, q_order=order, kv_order=order).to(device)


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time in milliseconds of each of ``fns``, timed in turns (one call of each per
    round), so that a change in the machine's load during the run weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def first_call_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call in milliseconds (for a compiled function's first call: its compile)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def run(args: argparse.Namespace) -> list[dict]:
    """CPU: dense SDPA against each backend through ``sparse_attention`` (token gathers included) on
    one plan per density and, for ``torch`` and ``flex``, against its kernel alone on tensors already
    in plan order; timed in turns. Compiled FlexAttention's first call (its compile) is timed apart."""
    from dit_sparse.attention import attention_in_plan_order, head_major

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    layout, q, k, v = make_inputs(args, device, dtype)
    flops_dense = 4 * layout.seq_len**2 * args.head_dim * args.heads
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    fns = {"sdpa (dense)": lambda: F.scaled_dot_product_attention(qt, kt, vt)}
    rows = {"sdpa (dense)": {"backend": "sdpa (dense)", "density": 1.0, "first_call_ms": None}}
    for target in args.densities:
        plan = make_plan(args, layout, target, device)
        qp, kp, vp = head_major(q, plan.q_order), head_major(k, plan.kv_order), head_major(v, plan.kv_order)
        for backend in args.backends:
            methods = {backend: lambda plan=plan, backend=backend: sparse_attention(q, k, v, plan, backend=backend)}
            if backend in ("torch", "flex"):
                methods[f"{backend} kernel (plan order)"] = (
                    lambda plan=plan, backend=backend, qp=qp, kp=kp, vp=vp: attention_in_plan_order(qp, kp, vp, plan, backend)
                )
            for method, fn in methods.items():
                name = f"{method} @ {target}"
                first = first_call_ms(fn) if backend == "flex" else None
                fns[name] = fn
                rows[name] = {"backend": method, "target_density": target, "density": plan.density(), "first_call_ms": first}
    with OtherCpuUse() as other:
        load_before = os.getloadavg()
        medians = interleaved_medians(fns, args.warmup, args.repeats)
        load_after = os.getloadavg()
    dense_ms = medians["sdpa (dense)"]
    for name, row in rows.items():
        row |= {"ms": medians[name], "speedup": dense_ms / medians[name],
                "tflops": flops_dense * row["density"] / medians[name] / 1e9}
    for name, row in rows.items():
        flex = rows.get(f"flex @ {row.get('target_density')}")
        if flex is not None and row["backend"] in ("torch", "flex"):
            row["vs_flex"] = flex["ms"] / row["ms"]
    args.load = {"other_cores": other.cores, "loadavg_before": load_before, "loadavg_after": load_after}
    return list(rows.values())


def run_kernels(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """GPU: dense SDPA (flash), compiled FlexAttention, the Triton kernel and the ``triton`` backend on
    one plan per density, and block-mass calibration; bf16 unless ``--dtype`` says otherwise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dit_sparse.attention import attention_in_plan_order
    from dit_sparse.kernels.block_mass_triton import block_mass_triton

    layout, q, k, v = make_inputs(args, device, getattr(torch, args.dtype or "bfloat16"))
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    flops_dense = 4 * layout.seq_len**2 * args.head_dim * args.heads

    def timed(method: str, density: float, target: float, fn: Callable[[], object]) -> dict:
        ms = median_time(fn, args.warmup, args.repeats, device)
        return {"method": method, "target_density": target, "density": density, "ms": ms,
                "tflops": flops_dense * density / ms / 1e9}

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = timed("sdpa flash (dense)", 1.0, 1.0, lambda: F.scaled_dot_product_attention(qt, kt, vt))
    chosen = timed("sdpa, torch's choice (dense)", 1.0, 1.0, lambda: F.scaled_dot_product_attention(qt, kt, vt))
    sdpa = min(flash, chosen, key=lambda row: row["ms"])  # the baseline: the faster dense backend
    rows = [flash, chosen]
    for target in args.densities:
        plan = make_plan(args, layout, target, device)
        density = plan.density()
        flex_row = timed("flex (compiled)", density, target,
                         lambda: attention_in_plan_order(qt, kt, vt, plan, backend="flex"))
        triton_row = timed("triton kernel", density, target,
                           lambda: attention_in_plan_order(qt, kt, vt, plan, backend="triton"))
        backend_row = timed("triton backend (with gathers)", density, target,
                            lambda: sparse_attention(q, k, v, plan, backend="triton"))
        for row in (flex_row, triton_row, backend_row):
            row["vs_flex"] = flex_row["ms"] / row["ms"]
        rows += [flex_row, triton_row, backend_row]
    block = args.block_size
    rows.append(timed("block mass (dense pass + mass)", 1.0, 1.0, lambda: block_mass_triton(qt, kt, block, block)))
    for row in rows:
        row["vs_sdpa"] = sdpa["ms"] / row["ms"]
    rows[-1]["tflops"] = None
    return rows


def check_targets(rows: list[dict]) -> list[str]:
    """One line per kernel target whose measurements are in ``rows``."""
    def find(method: str, target: float) -> dict | None:
        return next((r for r in rows if r["method"] == method and r["target_density"] == target), None)

    sdpa = max((r for r in rows if r["method"].startswith("sdpa")), key=lambda r: r["tflops"])
    checks = []
    dense = find("triton kernel", 1.0)
    if dense:
        checks.append(("Triton throughput at density 1.0 / the faster dense SDPA's", dense["tflops"] / sdpa["tflops"],
                       ">=", TARGETS["dense_throughput"]))
    sparse = find("triton kernel", TARGETS["target_density"])
    if sparse:
        checks.append((f"Triton speedup over the faster dense SDPA at density {TARGETS['target_density']}",
                       sparse["vs_sdpa"], ">=", TARGETS["speedup_vs_sdpa"]))
        checks.append((f"Triton speedup over FlexAttention at density {TARGETS['target_density']}",
                       sparse["vs_flex"], ">=", TARGETS["speedup_vs_flex"]))
    mass = find("block mass (dense pass + mass)", 1.0)
    checks.append(("block-mass calibration time / one dense SDPA", 1 / mass["vs_sdpa"], "<=",
                   TARGETS["calibration_cost"]))
    return [
        f"{name}: {value:.2f} (target {op} {goal}) {'met' if (value >= goal if op == '>=' else value <= goal) else 'MISSED'}"
        for name, value, op, goal in checks
    ]


CPU_TARGETS = {"speedup_vs_sdpa": 5.5, "speedup_vs_flex": 1.5, "target_density": 0.15, "full_plan_slowdown": 1.1}


def check_cpu_targets(rows: list[dict]) -> list[str]:
    """One line per CPU target of the ``torch`` backend (token gathers included) found in ``rows``."""
    def find(backend: str, target: float) -> dict | None:
        return next((r for r in rows if r["backend"] == backend and r.get("target_density") == target), None)

    checks = []
    sparse = find("torch", CPU_TARGETS["target_density"])
    if sparse:
        checks.append((f"torch speedup over dense SDPA at density {CPU_TARGETS['target_density']}", sparse["speedup"],
                       ">=", CPU_TARGETS["speedup_vs_sdpa"]))
        if "vs_flex" in sparse:
            checks.append((f"torch speedup over compiled Flex at density {CPU_TARGETS['target_density']}",
                           sparse["vs_flex"], ">=", CPU_TARGETS["speedup_vs_flex"]))
    full = find("torch", 1.0)
    if full:
        checks.append(("torch time at density 1.0 / dense SDPA's", 1 / full["speedup"], "<=", CPU_TARGETS["full_plan_slowdown"]))
    return [
        f"{name}: {value:.2f} (target {op} {goal}) {'met' if (value >= goal if op == '>=' else value <= goal) else 'MISSED'}"
        for name, value, op, goal in checks
    ]


def format_table(rows: list[dict]) -> str:
    lines = [
        "| method | density | ms | first call ms | speedup vs dense SDPA | speedup vs compiled Flex (with gathers) | effective TFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        first = "-" if r["first_call_ms"] is None else f"{r['first_call_ms']:.0f}"
        vs_flex = f"{r['vs_flex']:.2f}x" if "vs_flex" in r else "-"
        lines.append(f"| {r['backend']} | {r['density']:.3f} | {r['ms']:.1f} | {first} | {r['speedup']:.2f}x | {vs_flex} "
                     f"| {r['tflops']:.3f} |")
    return "\n".join(lines)


def format_kernel_table(rows: list[dict]) -> str:
    lines = [
        "| method | density | ms | effective TFLOP/s | speedup vs the faster dense SDPA | speedup vs FlexAttention |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        tflops = "-" if r["tflops"] is None else f"{r['tflops']:.1f}"
        vs_flex = f"{r['vs_flex']:.2f}x" if "vs_flex" in r else "-"
        lines.append(f"| {r['method']} | {r['density']:.3f} | {r['ms']:.2f} | {tflops} | {r['vs_sdpa']:.2f}x | {vs_flex} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="shape and densities (explicit flags override); default: wan480p on a GPU, cpu elsewhere")
    parser.add_argument("--grid", type=int, nargs=3, metavar=("T", "H", "W"))
    parser.add_argument("--text-len", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--tile", type=int, nargs=3)
    parser.add_argument("--densities", type=float, nargs="+")
    parser.add_argument("--mask", choices=sorted(MASKS), default="band")
    parser.add_argument("--backends", nargs="+", default=["torch", "flex"],
                        help="sparse backends to time on the CPU (flex: compiled FlexAttention past its eager bound)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("wan480p" if device.type == "cuda" else "cpu")
    if device.type != "cuda":
        if preset in GPU_PRESETS:
            print(f"No GPU: the {preset} preset times the GPU kernels; running the CPU comparison instead.")
            preset = "cpu"
        print("No GPU: timing the CPU path (the sparse backends against dense SDPA, in turns).")
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    layout = TokenLayout(tuple(args.grid), args.text_len)
    print(f"grid {tuple(args.grid)} + {args.text_len} text = {layout.seq_len} tokens, {args.heads} heads, "
          f"head dim {args.head_dim}, blocks of {args.block_size}, {args.mask} mask; {describe_machine(machine_info(device))}")
    if preset in GPU_PRESETS:
        rows = run_kernels(args, device)
        print(format_kernel_table(rows))
        print("\n".join(check_targets(rows)))
    else:
        rows = run(args)
        print(format_table(rows))
        print("\n".join(check_cpu_targets(rows)))
        load = args.load
        print(f"other processes used {load['other_cores']:.2f} cores on average while timing; load average "
              f"{'/'.join(f'{x:.2f}' for x in load['loadavg_before'])} before, "
              f"{'/'.join(f'{x:.2f}' for x in load['loadavg_after'])} after")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(device), "args": vars(args), "rows": rows}, f, indent=2, default=list)


if __name__ == "__main__":
    main()
