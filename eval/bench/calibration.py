"""Calibration cost of one attention layer against one dense SDPA call, and peak memory.

    python -m dit_sparse.eval.bench.calibration --preset 8k     # 8 x 32 x 32 = 8,192 tokens, 4 heads x 64
    python -m dit_sparse.eval.bench.calibration --preset 32k    # Wan2.1 480p grid, 32,760 tokens, 2 heads x 128
    python -m dit_sparse.eval.bench.calibration --preset wan480p --device cuda --profile   # GPU: a whole layer, bf16

Calibration is what the dense calibration step adds to that step's dense attention:
``planner.calibrate`` (block mass over every order the pattern needs, the semantic family's
k-means, the sampled rows of the error estimate) and ``planner.plan_from_calibration`` (each
family's masks, the error estimate, the choice per head), under ``--pattern`` (default: the library
default, ``auto``) at the library's default block size and budget. Dense SDPA, calibration and the
sparse op on the resulting plan (``sparse_attention``, ``torch`` backend) are timed in turns on
the synthetic attention of ``dit_sparse.eval.synthetic`` (its head types in turn; medians of ``--repeats`` after ``--warmup``); then each runs once more alone while
the process's peak resident memory is watched (Linux: ``/proc/self/clear_refs``; on CUDA the peak
GPU memory allocated), and the run prints the peak above the memory held before the call next to
what one fp32 ``S x S`` score matrix per head would take. On CUDA the inputs are bf16 and every
timing is synchronised; ``--profile`` adds the PyTorch profiler's table of one calibration (the ops
that took the most time, host and device), to find what calibration spends its time on.

Calibration's cost grows with the heads as dense attention's does, so a layer's ratio needs only a
few of its heads: ``--heads`` (or the preset's) says how many were measured. ``bench.planner``
gives the same ratio for every pattern at one size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from dit_sparse import SparseAttentionConfig, sparse_attention
from dit_sparse.eval.bench.attention import first_call_ms, interleaved_medians
from dit_sparse.eval.machine import OtherCpuUse, describe_machine, machine_info
from dit_sparse.eval.synthetic import HEAD_TYPES, synthetic_attention
from dit_sparse.planner import calibrate, plan_from_calibration

PRESETS = {
    "8k": {"grid": [8, 32, 32], "heads": 4, "head_dim": 64},
    # Wan2.1-1.3B at 480p, 81 frames: 21 x 30 x 52 = 32,760 tokens (the layer has 12 heads of 128)
    "32k": {"grid": [21, 30, 52], "heads": 2, "head_dim": 128},
    # the same shape with the whole layer's 12 heads (a GPU size)
    "wan480p": {"grid": [21, 30, 52], "heads": 12, "head_dim": 128},
}
TARGET = 2.0  # calibration time / one dense SDPA call


def run(args: argparse.Namespace) -> dict:
    types = [HEAD_TYPES[h % len(HEAD_TYPES)] for h in range(args.heads)]
    data = synthetic_attention(tuple(args.grid), types, head_dim=args.head_dim, seed=0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout = data.layout
    q, k, v = (x.to(device, dtype) for x in (data.q, data.k, data.v))
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    config = SparseAttentionConfig(pattern=args.pattern)
    calibration = calibrate(q, k, layout, config, v=v)
    plan, _ = plan_from_calibration(calibration, config)
    backend = "triton" if device.type == "cuda" else "torch"

    def calibrate_and_plan():
        return plan_from_calibration(calibrate(q, k, layout, config, v=v), config)

    fns = {name: _synchronised(fn, device) for name, fn in {
        "dense SDPA": lambda: F.scaled_dot_product_attention(qt, kt, vt),
        "calibrate": lambda: calibrate(q, k, layout, config, v=v),
        "plan": lambda: plan_from_calibration(calibration, config),
        "sparse op": lambda: sparse_attention(q, k, v, plan, backend=backend),
    }.items()}
    with OtherCpuUse() as other:
        load_before = os.getloadavg()
        ms = interleaved_medians(fns, args.warmup, args.repeats)
        load_after = os.getloadavg()
    peak_of = (lambda fn: peak_gpu_mib(fn, device)) if device.type == "cuda" else peak_mib
    peak = {
        "dense SDPA": peak_of(fns["dense SDPA"]),
        "calibrate + plan": peak_of(calibrate_and_plan),
        "sparse op": peak_of(fns["sparse op"]),
    }
    profile = profile_table(calibrate_and_plan, device) if args.profile else None
    return {
        "tokens": layout.seq_len, "heads": args.heads, "head_dim": args.head_dim, "pattern": args.pattern,
        "block_size": config.block_size, "density": plan.density(), "ms": ms,
        "calibration_ratio": (ms["calibrate"] + ms["plan"]) / ms["dense SDPA"], "peak_mib": peak,
        "scores_mib_per_head": layout.seq_len**2 * 4 / 2**20,
        "load": {"other_cores": other.cores, "loadavg_before": load_before, "loadavg_after": load_after},
        "device": args.device, "dtype": str(dtype).removeprefix("torch."), "profile": profile,
    }


def _synchronised(fn, device: torch.device):
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def peak_gpu_mib(fn, device: torch.device) -> float:
    """Peak GPU memory allocated during ``fn()`` above what was allocated before, in MiB."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def profile_table(fn, device: torch.device, rows: int = 25) -> str:
    """The PyTorch profiler's table of one call of ``fn``: the ops with the most time spent in
    them (on the device when it is CUDA, on the host otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    host = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    if device.type != "cuda":
        return host
    return host + "\n" + averages.table(sort_by="self_cuda_time_total", row_limit=rows)


def peak_mib(fn) -> float | None:
    """Peak resident memory of this process during ``fn()`` above what it held before, in MiB
    (``None`` where the kernel cannot reset the peak)."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kib(status.read_text(), "VmRSS")
    first_call_ms(fn)
    return (_status_kib(status.read_text(), "VmHWM") - before) / 1024


def _status_kib(text: str, field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def format_report(result: dict) -> str:
    ms, peak = result["ms"], result["peak_mib"]
    lines = [
        "| step | ms | / dense SDPA | peak MiB above before |",
        "|---|---|---|---|",
        f"| dense SDPA | {ms['dense SDPA']:.0f} | 1.00 | {_mib(peak['dense SDPA'])} |",
        f"| calibrate (block mass, k-means, sampled rows) | {ms['calibrate']:.0f} | {ms['calibrate'] / ms['dense SDPA']:.2f} | "
        f"{_mib(peak['calibrate + plan'])} (with plan) |",
        f"| plan (families, error estimate, choice) | {ms['plan']:.0f} | {ms['plan'] / ms['dense SDPA']:.2f} | |",
        f"| sparse op (density {result['density']:.3f}) | {ms['sparse op']:.0f} | {ms['sparse op'] / ms['dense SDPA']:.2f} | "
        f"{_mib(peak['sparse op'])} |",
    ]
    ratio = result["calibration_ratio"]
    lines.append(f"calibration / one dense SDPA call: {ratio:.2f} (target <= {TARGET}) {'met' if ratio <= TARGET else 'MISSED'}")
    lines.append(f"one fp32 S x S score matrix: {result['scores_mib_per_head']:.0f} MiB per head "
                 f"({result['scores_mib_per_head'] * result['heads']:.0f} MiB for the {result['heads']} heads)")
    load = result["load"]
    lines.append(f"other processes used {load['other_cores']:.2f} cores on average while timing; load average "
                 f"{'/'.join(f'{x:.2f}' for x in load['loadavg_before'])} before, "
                 f"{'/'.join(f'{x:.2f}' for x in load['loadavg_after'])} after")
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="8k")
    parser.add_argument("--grid", type=int, nargs=3, metavar=("T", "H", "W"))
    parser.add_argument("--heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--pattern", default="auto")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 there)")
    parser.add_argument("--profile", action="store_true", help="also print the profiler's table of one calibration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    parser.set_defaults(**PRESETS[args.preset])
    args = parser.parse_args(argv)
    for name in ("heads", "head_dim", "warmup", "repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}")
    result = run(args)
    device = torch.device(args.device)
    print(f"{result['tokens']} tokens (grid {tuple(args.grid)}), {args.heads} heads x {args.head_dim}, pattern "
          f"{args.pattern}, blocks of {result['block_size']}, {result['dtype']}; {describe_machine(machine_info(device))}")
    print(format_report(result))
    if result["profile"]:
        print(result["profile"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(device), "args": vars(args), "result": result}, f, indent=2)


if __name__ == "__main__":
    main()
