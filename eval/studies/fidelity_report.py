"""The fidelity study's report: ``fidelity.md`` with a table per part, ``fidelity.json`` and the
figures under ``img/`` (PSNR against speedup for every method; quality and density against video
length for each budget).

Example::

    >>> results = run_study(plan, prompts, model, warmup=1, repeats=1, seed=0)     # doctest: +SKIP
    >>> write_report(results | {"command": "...", "started": "...", "finished": "..."}, Path("out"))  # doctest: +SKIP
    PosixPath('out/fidelity.md')
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dit_sparse import SparseAttentionConfig
from dit_sparse.config import DEFAULT_DENSITY, PRESETS

from ..machine import describe_machine
from ..plots import save_figure
from ..report import write_json

AGREEMENT = ("colour", "shape", "motion", "all")
TARGET_PSNR = 30
TARGET_AGREEMENT = 0.95
MIN_GAIN = 1.0
PART_TITLES = {
    "pareto": "Pareto: every method at equal density",
    "aging": "Plan aging: how often to re-plan",
    "warmup": "Warm-up and dense layers",
    "length": "Length: fixed density against alpha * n^C",
}


# Dense calls of one size cost the same whatever the prompt: a wider spread of their wall times is
# other work on the machine, and the run's speedups are then not the method's.
STEADY_SPREAD = 1.5


def dense_spread(run: dict[str, Any]) -> tuple[float, float]:
    """The fastest and slowest dense call of ``run`` (one size of one study run), medians per prompt."""
    walls = [statistics.median(w) for w in run["dense"]["per_prompt_wall_seconds"]]
    return min(walls), max(walls)


def spread_is_load(spread: tuple[float, float]) -> bool:
    """Whether dense calls that took ``(fastest, slowest)`` seconds spread past :data:`STEADY_SPREAD`."""
    fastest, slowest = spread
    return slowest > STEADY_SPREAD * fastest


def mark_unsteady(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` of one study run with each row flagged ``unsteady`` when the run's dense calls of
    its size spread past :data:`STEADY_SPREAD`."""
    for run in results["runs"].values():
        unsteady = spread_is_load(dense_spread(run))
        for row in run["rows"]:
            row["unsteady"] = unsteady
    return results


def write_report(results: dict[str, Any], out: Path, save: bool = True) -> Path:
    """Write ``fidelity.md``, ``img/fidelity_*.png`` and (``save``) ``results/fidelity.json`` under
    ``out``; returns the Markdown file's path."""
    if "sources" not in results:   # one run (merged runs were marked each by its own dense calls)
        results = mark_unsteady(results)
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    main = results["runs"][results["main_size"]]
    pareto = [r for r in main["rows"] if r["part"] == "pareto"]
    if pareto:
        figures["pareto"] = save_figure(pareto_figure(pareto), out / "img" / "fidelity_pareto.png")
    checked = [r for r in main["rows"] if r.get("checks")]
    if checked:
        figures["aging"] = save_figure(aging_figure(checked), out / "img" / "fidelity_aging.png")
    if any(r["part"] == "length" for r in main["rows"]):
        figures["length"] = save_figure(length_figure(length_rows(results)), out / "img" / "fidelity_length.png")
    if save:
        (out / "results").mkdir(exist_ok=True)
        write_json(results, out / "results" / "fidelity.json")
    path = out / "fidelity.md"
    path.write_text(markdown(results, {part: str(p.relative_to(out)) for part, p in figures.items()}, out))
    return path


def read_results(path: Path) -> dict[str, Any]:
    """The results :func:`write_report` saved to ``path``, non-finite figures (saved as ``"inf"``,
    ``"nan"``) as floats again."""
    return _floats(json.loads(path.read_text()))


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' results as one report: each run's rows join the rows of the same video size (a
    method already there is not repeated), the first run's main size and dense figures head the
    page, and every run is listed with its command, dates and machine. Runs on different weights
    (their ``weights`` fingerprints differ) are refused: their figures are not comparable."""
    weights = {results.get("weights") for results in parts}
    if len(weights) > 1:
        raise ValueError(f"these runs were measured on different weights ({', '.join(map(str, sorted(weights, key=str)))}); "
                         "merge the runs of one model only")
    merged = {**parts[0], "runs": {}, "sources": []}
    for results in map(mark_unsteady, parts):
        merged["sources"].append(source(results))
        for name, run in results["runs"].items():
            entry = merged["runs"].setdefault(name, {**run, "rows": []})
            seen = {(r["part"], r["label"], r["budget"]) for r in entry["rows"]}
            entry["rows"] += [r for r in run["rows"] if (r["part"], r["label"], r["budget"]) not in seen]
    return merged


def source(results: dict[str, Any]) -> dict[str, Any]:
    """How one run ran: command, dates, methods measured, and the machine of its main size."""
    main = results["runs"][results["main_size"]]
    return {"command": results["command"], "started": results["started"], "finished": results["finished"],
            "methods_done": results["methods_done"], "machine": main["machine"], "notes": main["notes"],
            "dense_spread": dense_spread(main)}


def _floats(value: Any) -> Any:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    return [_floats(v) for v in value] if isinstance(value, list) else value


def markdown(results: dict[str, Any], figures: dict[str, str], out: Path) -> str:
    """The report: what it measures and the command that writes it to ``out``, how it ran, a table
    (and figure) per part, what the figures say and what was not measured."""
    main = results["runs"][results["main_size"]]
    frames, height, width = main["size"]
    sources = results.get("sources") or [source(results)]
    commands = []
    for run in sources:
        words = run["command"].split()
        at = words.index("--out")
        commands.append(" ".join(words[:at + 2]).replace(f" --out {words[at + 1]}", f" --out {words[at + 1]} \\\n   ")
                        + " " + " ".join(words[at + 2:]))
    if len(sources) > 1:
        commands += [f"# then, with the results/fidelity.json of every run copied to {out}/results/fidelity*.json:",
                     f"python -m dit_sparse.eval.studies.fidelity --out {out} --report-only"]
    lines = [
        "# Fidelity on the reference model: methods, re-planning, warm-up, length", "",
        "Sparse attention on the trained reference model (docs/reference-model.md), compared with dense attention "
        "on the same held-out prompts and seeds: every method at equal density, how often plans should be made "
        "again, how many steps and layers should stay dense, and which budget holds quality as videos grow. "
        "`python -m dit_sparse.eval.studies.fidelity --out DIR` writes this page, its figures and "
        "`DIR/results/fidelity.json` (after every method); `--report-only` writes the page again from every "
        "`DIR/results/fidelity*.json`, one per run. This page comes from:", "",
        "<!-- needs: hours of CPU at this scale -->", "```bash", *commands, "```", "",
        "## How this ran", "",
    ]
    for index, run in enumerate(sources, 1):
        lines += [
            f"- Run {index}: `{run['command']}`, {run['started']} to {run['finished']} (UTC), methods measured: "
            f"{run['methods_done']}",
            f"  - Machine: {describe_machine(run['machine'])}",
            *[f"  - Note: {note}" for note in run["notes"]],
        ]
        if spread_is_load(run["dense_spread"]):
            fastest, slowest = run["dense_spread"]
            lines.append(f"  - Timing: its dense calls took from {fastest:.1f} to {slowest:.1f} s per prompt at one size "
                         "(they should cost the same): other work slowed some of them, so this run's speedups "
                         "are not the methods'; they are marked (load) in the tables")
    lines += [
        f"- Weights: the reference model's, fingerprint `{results.get('weights', 'not recorded')}` "
        "(`dit_sparse.eval.reference.reference_weights_id()`)",
        f"- Scale: {_prompt_counts(results)}, {results['steps']} steps, main size {frames} frames of "
        f"{height}x{width} ({main['tokens']} video tokens per attention call); dense videos made once per prompt, "
        "size and run, and shared by every method of that run (each row's speedup is against them)",
        f"- LPIPS: {results['lpips']}",
        "",
        "Figures are means over prompts: PSNR per frame, then over frames, then over prompts (`inf`: identical "
        "frames); agreement is the share of the dense video's objects whose colour, shape and motion the clip "
        "detector reads the same in the sparse one; speedups are dense time over method time, end to end (the "
        "whole pipeline call) and in self-attention. The dense videos are timed once, when a run starts: on a "
        "machine whose load changes during the run, a speedup compares different loads, and one above what "
        f"removing all self-attention could give ({speedup_cap(main['dense']):.2f}x at the main size) is marked "
        "\"(load)\": a change of load, not the method.",
    ]
    for part, title in PART_TITLES.items():
        rows = sorted((r | {"speedup_cap": speedup_cap(main["dense"])} for r in main["rows"] if r["part"] == part),
                      key=_budget_order)
        if not rows:
            continue
        lines += ["", f"## {title}", "", f"On {rows[0]['prompts']} prompts.", ""]
        if part == "length":
            lines += length_table(length_rows(results))
        else:
            lines += method_table(rows)
        if any(r.get("checks") for r in rows):
            lines += ["", "The per-step check (`recalibrate_error`) estimates each layer's relative attention output "
                      "error on sampled query rows at every sparse step, before any re-plan; its figures below are "
                      "means over layers, contexts and prompts at each step (\"largest\": the worst layer's mean).",
                      "", *checks_table([r for r in rows if r.get("checks")])]
        if part in figures:
            lines += ["", f"![{title}]({figures[part]})"]
    lines += ["", "## What the figures say", "", *findings(results)]
    lines += ["", "## Defaults from evidence", "", *defaults_evidence(results)]
    lines += ["", "## Not measured here", "", *not_measured(results)]
    return "\n".join(lines) + "\n"


def _budget_order(row: dict[str, Any]) -> tuple[int, float]:
    """Pareto rows by requested density, the peers' own budgets first; other parts keep their order."""
    if row["part"] != "pareto":
        return (0, 0.0)
    return (0, 0.0) if row["budget"] == "own" else (1, float(row["budget"]))


def _prompt_counts(results: dict[str, Any]) -> str:
    """How many held-out prompts each part ran on: one number, or the parts grouped by it."""
    counts: dict[str, int] = {}
    for run in results["runs"].values():
        for row in run["rows"]:
            counts[row["part"]] = min(counts.get(row["part"], row["prompts"]), row["prompts"])
    groups = sorted({n for n in counts.values()}, reverse=True)
    if len(groups) == 1:
        return f"{groups[0]} held-out prompts"
    names = {"pareto": "Pareto", "aging": "plan aging", "warmup": "warm-up", "length": "length"}
    parts = []
    for n in groups:
        these = [names[part] for part in PART_TITLES if counts.get(part) == n]
        parts.append(f"the {' and '.join(these)} part{'s' if len(these) > 1 else ''}")
    return f"{groups[0]} held-out prompts for {parts[0]}, " + ", ".join(
        f"the first {n} of them for {these}" for n, these in zip(groups[1:], parts[1:])
    )


def findings(results: dict[str, Any]) -> list[str]:
    """Sentences computed from the figures: the library default against the targets (30 dB, 95 %
    agreement), ``auto`` against each method at equal density and against SVG2 at twice its
    density, the best re-planning and warm-up variants, and how each length budget holds up."""
    main = results["runs"][results["main_size"]]
    rows = main["rows"]
    dense = main["dense"]
    share = dense["attention_seconds"].get("self", 0.0) / dense["wall_seconds"]
    lines = [f"- Self-attention is {share:.0%} of a dense call's time at the main size ({main['tokens']} video "
             f"tokens): the most any attention speedup can save end to end."]
    default = next((r for r in rows if r["part"] != "length" and _is_default(r["config"])), None)
    if default is not None:
        lines.append(f"- Library defaults ({_describe(default)}): PSNR {_num(default['psnr'], 2)} dB (target 30), "
                     f"detector agreement {_pct(default['agreement'].get('all'))} (target 95 %), end-to-end speedup "
                     f"{_num(default['speedup'], 2, 'x')}, self-attention {_num(default['attention_speedup'], 2, 'x')}.")
    pareto = [r for r in rows if r["part"] == "pareto"]
    for budget in dict.fromkeys(r["budget"] for r in pareto if r["budget"] != "own"):
        same = {r["label"]: r for r in pareto if r["budget"] == budget}
        if "auto" not in same:
            continue
        auto = same.pop("auto")
        if not same:
            continue
        beaten = [label for label, r in same.items() if _finite(r["psnr"]) > _finite(auto["psnr"])]
        best = max(same.values(), key=lambda r: _finite(r["psnr"]), default=None)
        verdict = ("at least as high as every other method's" if not beaten
                   else f"below {', '.join(beaten)}'s (best: {best['label']}, {_num(best['psnr'], 2)} dB)")
        lines.append(f"- Density {budget}: `auto` {_num(auto['psnr'], 2)} dB, {verdict}.")
        over = [r for r in same.values() if r["density"] is not None and r["density"] > 1.5 * float(budget)]
        if over:
            lines.append(f"  Asked for {budget}, " + ", ".join(f"{r['label']} spent {_num(r['density'], 3)}" for r in over)
                         + ": equal requests are not equal spending (see the density column).")
    lines += peer_matches(pareto)
    for part in ("aging", "warmup"):
        mine = [r for r in rows if r["part"] == part]
        if mine:
            best = max(mine, key=lambda r: -1 if r["psnr"] is None or math.isinf(r["psnr"]) else r["psnr"])
            ranked = ", ".join(f"{r['label']} {_num(r['psnr'], 2)} dB ({_num(r['speedup'], 2, 'x')})" for r in mine)
            lines.append(f"- {PART_TITLES[part].split(':')[0]}: best finite PSNR (`inf`: every step dense) with "
                         f"{best['label']}; {ranked}.")
    once = next((r for r in rows if r.get("checks") and r["config"]["recalibrate_error"] == math.inf), None)
    if once is not None:
        errors = once["checks"]["error_by_step"]
        first, last = min(errors, key=int), max(errors, key=int)
        worst = max(errors, key=lambda step: errors[step])
        lines.append(f"- A plan made once: its estimated attention error is {_num(errors[first], 3)} at step {first}, "
                     f"{_num(errors[worst], 3)} at its worst (step {worst}) and {_num(errors[last], 3)} at step {last} "
                     "(mean over layers).")
    length = length_rows(results)
    for label in dict.fromkeys(r["label"] for r in length):
        mine = [r for r in length if r["label"] == label]
        trend = ", ".join(f"{r['tokens']} tokens: {_num(r['psnr'], 2)} dB at density {_num(r['density'], 3)}" for r in mine)
        lines.append(f"- Length, {label}: {trend}.")
    return lines or ["- Nothing measured yet."]


def peer_matches(pareto: list[dict[str, Any]]) -> list[str]:
    """``auto`` against each peer preset's row by the density each spent, which is what costs time
    (a preset's rule sets its spending, whatever it was asked): the ``auto`` row that spent the
    most without spending more than the peer, and, for SVG2, the one that spent at most half; each
    with its end-to-end speedup (the peers' rules differ in dense steps and re-planning too).

    Example::

        >>> auto = {"label": "auto", "budget": "0.3", "density": 0.3, "psnr": 31.0, "speedup": 1.2, "config": {"pattern": "auto"}}
        >>> svg2 = {"label": "svg2", "budget": "0.25", "density": 0.6, "psnr": 30.0, "speedup": 0.9, "config": {"pattern": "svg2"}}
        >>> peer_matches([auto, svg2])
        ['- svg2 asked for 0.25 spent 0.600: `auto` spending no more (density 0.3, spent 0.300) 31.00 dB at 1.20x, at least as high as its 30.00 dB at 0.90x; at most half (density 0.3, spent 0.300) 31.00 dB at 1.20x, at least as high as it.']
    """
    autos = [r for r in pareto if r["label"] == "auto" and r["density"] is not None]
    lines = []
    for peer in (r for r in pareto if r["config"].get("pattern") in PRESETS and r["density"] is not None):
        shares = [(1.0, "spending no more")] + ([(0.5, "at most half")] if peer["config"]["pattern"] == "svg2" else [])
        said = []
        for share, words in shares:
            auto = max((r for r in autos if r["density"] <= share * peer["density"]), key=lambda r: r["density"], default=None)
            if auto is not None:
                verdict = "at least as high as" if _finite(auto["psnr"]) >= _finite(peer["psnr"]) else "below"
                theirs = "it" if said else f"its {_num(peer['psnr'], 2)} dB at {_num(peer['speedup'], 2, 'x')}"
                said.append(f"{words} (density {auto['budget']}, spent {_num(auto['density'], 3)}) "
                            f"{_num(auto['psnr'], 2)} dB at {_num(auto['speedup'], 2, 'x')}, {verdict} {theirs}")
        if said:
            asked = "on its own budget" if peer["budget"] == "own" else f"asked for {peer['budget']}"
            lines.append(f"- {peer['config']['pattern']} {asked} spent {_num(peer['density'], 3)}: `auto` "
                         + "; ".join(said) + ".")
    return lines


def defaults_evidence(results: dict[str, Any]) -> list[str]:
    """What the figures pick for each default of ``SparseAttentionConfig()``, by stated rules: among
    the densities at which ``auto`` runs faster than dense end to end, the smallest that meets both
    quality targets (30 dB, 95 % agreement; else the one with the most agreement), the fewest dense
    steps at which PSNR meets 30 dB, a dense first layer and a dense last step only when they gain at least 1 dB, and a re-planning schedule
    only when it gains at least 1 dB over planning once and stays faster than dense; each rule's pick
    beside the default."""
    default = SparseAttentionConfig(density=DEFAULT_DENSITY).to_dict()
    rows = results["runs"][results["main_size"]]["rows"]
    lines = []
    auto = sorted((r for r in rows if r["part"] == "pareto" and r["label"] == "auto" and r["budget"] != "own"),
                  key=lambda r: float(r["budget"]))
    faster = [r for r in auto if r["speedup"] is not None and r["speedup"] > 1]
    if auto:
        meeting = [r for r in faster if _finite(r["psnr"]) >= TARGET_PSNR and (r["agreement"].get("all") or 0) >= TARGET_AGREEMENT]
        pick = meeting[0] if meeting else max(faster, key=lambda r: (r["agreement"].get("all") or 0, -float(r["budget"])), default=None)
        rule = ("none runs faster than dense, so none" if pick is None else "the smallest that meets both" if meeting
                else "none meets both, so the one with the most agreement")
        slower = [r["budget"] for r in auto if r not in faster]
        lines.append(f"- Budget: `auto` against the targets ({TARGET_PSNR} dB, {TARGET_AGREEMENT:.0%} agreement) at each "
                     f"measured density: " + ", ".join(f"{r['budget']}: {_num(r['psnr'], 2)} dB, {_pct(r['agreement'].get('all'))}, "
                                                      f"{_num(r['speedup'], 2, 'x')}" for r in auto)
                     + (f"; left out as slower than dense end to end: {', '.join(slower)}" if slower else "")
                     + f"; {rule}: density {pick['budget'] if pick else '–'}. The default is density {DEFAULT_DENSITY}.")
    warmup = [r for r in rows if r["part"] == "warmup"]
    shares = sorted((r for r in warmup if r["label"].endswith("dense steps")), key=lambda r: r["config"]["dense_steps"])
    if shares:
        meeting = [r["label"] for r in shares if _finite(r["psnr"]) >= TARGET_PSNR]
        lines.append(f"- Warm-up: the fewest dense steps whose PSNR meets {TARGET_PSNR} dB: "
                     f"{meeting[0] if meeting else 'none measured'} ({_psnrs(shares, 'label')}); the default is "
                     f"{default['dense_steps']:.0%} dense steps.")
    base = next((r for r in warmup if _is_default(r["config"])), None)
    for label, field in (("first layer", "dense_layers"), ("last step", "dense_last_steps")):
        flipped = next((r for r in warmup if r["label"].startswith(label)), None)
        if base is None or flipped is None:
            continue
        dense, sparse = (base, flipped) if keeps_dense(base["config"], field) else (flipped, base)
        gain = _finite(dense["psnr"]) - _finite(sparse["psnr"])
        lines.append(f"- {label.capitalize()}: dense gains {_num(gain, 2)} dB ({_num(dense['speedup'], 2, 'x')} "
                     f"against {_num(sparse['speedup'], 2, 'x')} sparse), so {'dense' if gain >= MIN_GAIN else 'sparse'} "
                     f"by the {MIN_GAIN:g} dB rule; the default is {'dense' if keeps_dense(default, field) else 'sparse'}.")
    aging = [r for r in rows if r["part"] == "aging" and r["psnr"] is not None and math.isfinite(r["psnr"])]
    once = next((r for r in aging if r["label"] == "recalibrate plan once"), None)
    if once is not None and len(aging) > 1:
        best = max(aging, key=lambda r: r["psnr"])
        gain = best["psnr"] - once["psnr"]
        pick = best["label"] if gain >= MIN_GAIN and best["speedup"] > 1 else "plan once"
        lines.append(f"- Re-planning: among the schedules that leave sparse steps (finite PSNR), the best, "
                     f"{best['label']}, gains {_num(gain, 2)} dB over planning once at {_num(best['speedup'], 2, 'x')} "
                     f"end to end against {_num(once['speedup'], 2, 'x')}; a schedule is picked when it gains at least "
                     f"{MIN_GAIN:g} dB and stays faster than dense: {pick}. The default plans once "
                     "(`recalibrate_at=()`, `recalibrate_error=None`).")
    return lines or ["- Nothing measured yet."]


def keeps_dense(config: dict[str, Any], field: str) -> bool:
    """Whether a config dict keeps the first layer (``field="dense_layers"``) or the last step
    (``"dense_last_steps"``) dense."""
    return 0 in config[field] if field == "dense_layers" else config[field] > 0


def _psnrs(rows: list[dict[str, Any]], name: str) -> str:
    return ", ".join(f"{r[name]}: {_num(r['psnr'], 2)} dB" for r in rows)


def not_measured(results: dict[str, Any]) -> list[str]:
    """What the study leaves out, by design or because the run was cut short."""
    lines = []
    from ..reference import reference_call_kwargs
    from .fidelity import METHODS

    default = reference_call_kwargs()
    main = results["runs"][results["main_size"]]
    if main["size"] != [default["num_frames"], default["height"], default["width"]] or (
            results["steps"] != default["num_inference_steps"]):
        lines.append(f"- The model's default size, {default['num_frames']} frames of {default['height']}x"
                     f"{default['width']} in {default['num_inference_steps']} steps: this run used "
                     f"{_size(main['size'])} in {results['steps']} steps.")
    own = {"svg2 (own budget)": "svg2_own", "radial_paper (own budget)": "radial_paper"}
    ran = {own.get(r["label"], r["label"]) for r in main["rows"] if r["part"] == "pareto"}
    missing = [m for m in METHODS if m not in ran]
    if missing and ran:
        lines.append(f"- In the Pareto part: {', '.join(missing)}.")
    if results["lpips"].startswith("skipped"):
        lines.append(f"- LPIPS: {results['lpips']}.")
    counts = [[int(n) for n in run["methods_done"].split(" of ")] for run in results.get("sources") or [results]]
    done, total = (sum(column) for column in zip(*counts))
    if done < total:
        lines.append(f"- {total - done} of the {total} methods the runs planned (counted per run): the runs were "
                     "stopped before them; the tables show what was measured.")
    return lines or ["- Nothing the study plans was left out."]


def _size(size: list[int]) -> str:
    frames, height, width = size
    return f"{frames} frames of {height}x{width}"


def _is_default(config: dict[str, Any]) -> bool:
    """Whether a row's config is ``SparseAttentionConfig()`` with its default budget made explicit."""
    default = SparseAttentionConfig(density=DEFAULT_DENSITY).to_dict()
    return config == default


def _describe(row: dict[str, Any]) -> str:
    c = row["config"]
    return (f"{c['pattern']}, density {c['density']}, dense steps {c['dense_steps']}, dense layers "
            f"{c['dense_layers'] or 'none'}, on {row['prompts']} prompts")


def method_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per method: budget, density spent, PSNR, SSIM, LPIPS, agreement, speedups."""
    head = ["method", "budget", "density spent", "PSNR (dB)", "SSIM", "LPIPS",
            *(f"agree {a}" for a in AGREEMENT), "speedup", "attention speedup"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["label"], r["budget"], _num(r["density"], 3), _num(r["psnr"], 2), _num(r["ssim"], 4),
                 _num(r["lpips"], 4), *(_pct(r["agreement"].get(a)) for a in AGREEMENT),
                 _speedup(r), _num(r["attention_speedup"], 2, "x") + (" (load)" if r.get("unsteady") else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def speedup_cap(dense: dict[str, Any]) -> float:
    """The end-to-end speedup that removing all self-attention from a dense call would give,
    ``1 / (1 - share)``: a measured speedup above it comes from a change of the machine's load
    between the dense run and the method's, not from the method."""
    share = dense["attention_seconds"].get("self", 0.0) / dense["wall_seconds"]
    return 1 / (1 - share) if share < 1 else math.inf


def _speedup(row: dict[str, Any]) -> str:
    over_cap = row["speedup"] is not None and row["speedup"] > row["speedup_cap"]
    flag = " (load)" if over_cap or row.get("unsteady") else ""
    return _num(row["speedup"], 2, "x") + flag


def checks_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per checked method: re-plans per call, the worst layer's mean error, and the mean
    estimated error at each step."""
    steps = sorted({step for r in rows for step in r["checks"]["error_by_step"]}, key=int)
    head = ["method", "re-plans per call", "largest", *(f"step {step}" for step in steps)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        checks = r["checks"]
        cells = [r["label"], _num(checks["replans_per_call"], 1), _num(max(checks["max_error_by_step"].values()), 3),
                 *(_num(checks["error_by_step"].get(step), 3) for step in steps)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def aging_figure(rows: list[dict[str, Any]]) -> Figure:
    """The estimated attention error of the plan in use at each step, one line per checked method."""
    fig = Figure(figsize=(6.5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for r in rows:
        steps = sorted(r["checks"]["error_by_step"], key=int)
        ax.plot([int(s) for s in steps], [r["checks"]["error_by_step"][s] for s in steps], marker="o", label=r["label"])
    ax.set_xlabel("denoising step")
    ax.set_ylabel("relative attention error")
    ax.set_title("Error of the plan in use, before any re-plan (mean over layers)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def length_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every length-part row of every size, with its size's token count."""
    return [r | {"tokens": run["tokens"], "size": run["size"], "speedup_cap": speedup_cap(run["dense"])}
            for run in sorted(results["runs"].values(), key=lambda run: run["tokens"])
            for r in run["rows"] if r["part"] == "length"]


def length_table(rows: list[dict[str, Any]]) -> list[str]:
    head = ["size (F x H x W)", "tokens", "budget", "requested", "density spent", "PSNR (dB)", "SSIM",
            "agree all", "speedup"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = ["x".join(map(str, r["size"])), str(r["tokens"]), r["label"], r["budget"], _num(r["density"], 3),
                 _num(r["psnr"], 2), _num(r["ssim"], 4), _pct(r["agreement"].get("all")), _speedup(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pareto_figure(rows: list[dict[str, Any]]) -> Figure:
    """PSNR against end-to-end speedup, one colour per method, a marker per requested budget."""
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    markers = dict(zip(dict.fromkeys(r["budget"] for r in rows), "osD^v<>p*"))
    for index, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
        for r in (r for r in rows if r["label"] == label):
            colour = f"C{index % 10}"
            ax.scatter(r["speedup"], _finite(r["psnr"]), marker=markers[r["budget"]], s=40, edgecolors=colour,
                       facecolors="none" if r.get("unsteady") else colour,
                       label=label if r is next(x for x in rows if x["label"] == label) else None)
    for budget, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=f"budget {budget}")
    if any(r.get("unsteady") for r in rows):
        ax.scatter([], [], facecolors="none", edgecolors="grey", label="hollow: timed under load")
    ax.set_xlabel("end-to-end speedup over dense")
    ax.set_ylabel("PSNR vs dense (dB, frame mean)")
    ax.set_title("Quality against speed, every method")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right center", fontsize=7, frameon=False)
    return fig


def length_figure(rows: list[dict[str, Any]]) -> Figure:
    """PSNR and density spent against video tokens, one line per budget."""
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    psnr, density = fig.subplots(1, 2)
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        tokens = [r["tokens"] for r in mine]
        psnr.plot(tokens, [_finite(r["psnr"]) for r in mine], marker="o", label=label)
        density.plot(tokens, [r["density"] for r in mine], marker="o", label=label)
    for ax, name in ((psnr, "PSNR vs dense (dB)"), (density, "density spent")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("video tokens per attention call")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    density.legend(fontsize=7)
    return fig


def _finite(value: float | None) -> float:
    """A PSNR to plot: ``inf`` (identical frames) drawn at 100 dB."""
    return float("nan") if value is None else min(value, 100.0)


def _num(value: float | None, digits: int, suffix: str = "") -> str:
    if value is None:
        return "–"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}{suffix}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"
