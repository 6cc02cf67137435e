"""Rendering results (see :mod:`dit_sparse.eval.results`): a terminal table, ``results.md`` and
``results.json``.

Example::

    >>> print(format_terminal(results))                     # doctest: +SKIP
    >>> write_json(results, Path("eval-out/results.json"))   # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .machine import describe_machine

COLUMNS = ("variant", "wall s", "speedup", "self-attn s", "attn speedup", "calib s", "dense steps", "density",
           "FLOPs saved", "PSNR frame-mean dB", "PSNR global dB", "SSIM", "LPIPS", "flicker", "detector agree")


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row for dense, then one per config, in :data:`COLUMNS` order."""
    dense = results["dense"]
    rows = [["dense", _num(dense["wall_seconds"], 2), "1.00x", _num(dense["attention_seconds"]["self"], 2), "1.00x",
             "-", "all", "1.000", "0%", "-", "-", "-", "-", _num(dense["vbench"].get("temporal_flickering"), 4), "-"]]
    for config in results["configs"]:
        fidelity = config["fidelity"]
        rows.append([
            config["label"],
            _num(config["wall_seconds"], 2),
            f"{config['speedup']:.2f}x",
            _num(config["attention_seconds"]["self"], 2),
            "-" if config["self_attention_speedup"] is None else f"{config['self_attention_speedup']:.2f}x",
            _num(config["calibration_seconds"], 2),
            f"{config['dense_steps']}/{config['steps']}",
            _num(config["mean_sparse_density"], 3),
            f"{config['flops_saved_fraction']:.0%}",
            _num(fidelity["psnr_frame_mean"], 2),
            _num(fidelity["psnr_global"], 2),
            _num(fidelity["ssim"], 4),
            _num(fidelity["lpips"], 4),
            _num(config["vbench"].get("temporal_flickering"), 4),
            "-" if config["detector_agreement"] is None else _percent(config["detector_agreement"]["all"]),
        ])
    return rows


def format_terminal(results: dict[str, Any]) -> str:
    """The table with aligned columns, under the machine and model lines and above the notes."""
    rows = [list(COLUMNS), *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*_header(results), "", *lines, "", *_footer(results)])


def format_markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    """``results.md``: setup, the table, notes, skipped metrics, VBench, plots (paths relative to it)."""
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    vbench = _vbench_lines(results)
    parts = [
        "# dit-sparse evaluation", "", *[f"- {line}" for line in _header(results)], "", *table, "",
        *[f"- {line}" for line in _footer(results)],
    ]
    if vbench:
        parts += ["", "## VBench", "", *vbench]
    plans = [line for config in results["configs"] for line in _plan_lines(config)]
    if plans:
        parts += ["", "## Plans: each head's family, mass recall and density", "", *plans]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{title}]({path})" for title, path in plots.items()]
    return "\n".join(parts) + "\n"


def write_json(results: dict[str, Any], path: Path) -> None:
    """``results.json``; non-finite floats (an ``inf`` PSNR of identical frames) become strings."""
    path.write_text(json.dumps(_finite(results), indent=2) + "\n")


def write_markdown(results: dict[str, Any], path: Path, plots: dict[str, str]) -> None:
    path.write_text(format_markdown(results, plots))


def _header(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    frames, height, width, _ = s["frames_shape"]
    return [
        f"model: {results['model']['name']}",
        f"machine: {describe_machine(results['machine'])}",
        f"video: {frames} frames of {height}x{width}, {s['steps']} steps, guidance {s['guidance_scale']}, "
        f"seed {s['seed']}, {len(results['prompts'])} prompt(s), {s['device']} {s['dtype']}",
        f"timing: median of {s['repeats']} timed run(s) per prompt after {s['warmup']} warm-up run(s) per variant",
    ]


def _footer(results: dict[str, Any]) -> list[str]:
    lines = list(results["notes"]) + _detector_lines(results)
    lines.append("density: fraction of the attention FLOPs kept by the sparse calls; FLOPs saved: over every "
                 "self-attention call of the run, dense steps and layers included")
    lines.append("self-attn s: time inside the self-attention modules (projections, norms, RoPE, attention, output)")
    lines.append(f"flicker: VBench temporal_flickering ({results['temporal_flickering_source']})")
    if results["skipped"]["lpips"]:
        lines.append(f"LPIPS {results['skipped']['lpips']}")
    lines += [f"VBench {dim} {reason}" for dim, reason in results["skipped"]["vbench"].items()]
    return lines


def _detector_lines(results: dict[str, Any]) -> list[str]:
    """The clip detector's figures (reference model): prompt adherence of the dense videos, what the
    agreement column counts, and the words of the prompts that the model does not know."""
    adherence = results.get("prompt_adherence")
    if adherence is None:
        return []
    accuracy = ", ".join(f"{name} {_percent(value)}" for name, value in adherence["accuracy"].items())
    lines = [f"prompt adherence (the detector reads the dense videos against {adherence['checked']} prompt(s) "
             f"in the clips' phrasing): {accuracy}",
             "detector agree: share of the detector's readings (background, and each object's colour, shape and "
             "motion) that are the same in the sparse video as in the dense one"]
    for index, prompt in enumerate(adherence["prompts"]):
        if prompt["unknown_words"]:
            lines.append(f"prompt {index} has words the model does not know (read as <unk>): "
                         f"{', '.join(prompt['unknown_words'])}; it knows: {', '.join(adherence['vocabulary'])}")
    return lines


def _plan_lines(config: dict[str, Any]) -> list[str]:
    """Per calibrated layer (and CFG context), each head's family, recall and density, under the share
    of heads that went sparse."""
    if not config["plans"]:
        return []
    lines = [f"**{config['label']}**: {_percent(config['sparse_head_share'])} of the heads sparse", "",
             "| layer | context | step | heads: family (recall, density) |", "|---|---|---|---|"]
    for plan in config["plans"]:
        heads = "; ".join(f"{family} ({recall:.2f}, {density:.2f})"
                          for family, recall, density in zip(plan["family"], plan["recall"], plan["density"], strict=True))
        lines.append(f"| {plan['layer']} | {plan['context']} | {plan['step']} | {heads} |")
    return [*lines, ""]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _vbench_lines(results: dict[str, Any]) -> list[str]:
    dims = sorted({dim for dim in results["dense"]["vbench"]} - {"temporal_flickering"})
    if not dims:
        return []
    variants = [("dense", results["dense"])] + [(c["label"], c) for c in results["configs"]]
    lines = ["| variant | " + " | ".join(dims) + " |", "|---|" + "---|" * len(dims)]
    lines += [f"| {name} | " + " | ".join(_num(v["vbench"].get(d), 4) for d in dims) + " |" for name, v in variants]
    return lines


def _num(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
