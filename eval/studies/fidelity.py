"""The fidelity study on the reference model: who wins at equal density, how plans age, how much dense
warm-up is needed, and which budget keeps quality as videos grow. See docs/fidelity.md.

    python -m dit_sparse.eval.studies.fidelity --out fidelity-out      # every part, 16 prompts, 29x128x128
    python -m dit_sparse.eval.studies.fidelity --out small --parts pareto --methods auto svg2 --size 9 80 80

Parts (``--parts``, default all):

- ``pareto``: ``auto``, each family and each peer preset (``svg1``, ``svg2`` with the density in place
  of their own budget) at each ``--densities``, and ``radial_paper`` and SVG2 (``svg2_own``) once at
  their own budgets; ``--methods`` picks among them.
- ``aging``: the default config with its plans made once, recalibrated every 4 and every 2 steps,
  and at every sparse step (each recalibration is a dense pass); then with the per-step check of
  ``recalibrate_error``: recording the error of a plan made once at every later step, re-planning
  every sparse step from that step's queries and keys (the peers' way), and re-planning a layer
  only when its error passes each ``--drift-bounds``.
- ``warmup``: the default config with 0, 10, 25, 40 % dense steps, with and without the first layer
  dense, with and without the last step dense (one factor at a time).
- ``length``: at each ``--length-sizes`` (the first video size too), a fixed density against
  ``alpha * n**C`` budgets matched to it at the smallest size.

Every method at the main ``--size`` compares with the same dense videos, generated once per prompt
(``--part-prompts`` runs the parts other than Pareto on the first prompts only). Methods run one at
a time, the most telling first (see :func:`plan_study`). Each method's figures are means over the
prompts: per-frame PSNR, SSIM, LPIPS (when its weights are on disk), the clip detector's agreement
with the dense video (colour, shape, motion), and the end-to-end and self-attention speedups
measured in the same process. Writes ``fidelity.md``, ``results/fidelity.json`` and
``img/fidelity_*.png`` under ``--out`` after every method (a run cut short keeps what it
measured); ``--report-only`` writes the report again from the saved results.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dit_sparse import SparseAttentionConfig
from dit_sparse.budget import Budget
from dit_sparse.config import DEFAULT_DENSITY, PRESETS
from dit_sparse.planner import FAMILIES

from ..harness.settings import GenerationSettings
from ..reference.components import ReferenceSizes

PARTS = ("pareto", "aging", "warmup", "length")
METHODS = ("auto", *FAMILIES, "svg1", "svg2", "radial_paper", "svg2_own")
DENSITIES = (0.15, 0.10, 0.25)  # the library's default density first
DENSE_STEP_SHARES = (0.0, 0.10, 0.25, 0.40)
EXPONENTS = (0.5, 0.75)
LENGTH_SIZES = ((13, 64, 64), (29, 96, 96))
DRIFT_BOUNDS = (0.25, 0.35)


@dataclass(frozen=True)
class Method:
    """One row of a part: what it is called, its budget as requested, and its config."""

    part: str
    label: str
    budget: str
    config: SparseAttentionConfig


@dataclass(frozen=True)
class Stage:
    """Methods run at one video size on the first ``prompts`` prompts."""

    size: tuple[int, int, int]
    prompts: int
    methods: list[Method]


@dataclass
class StudyPlan:
    """What the study runs, stage by stage (see :func:`plan_study`); every stage at one size compares
    with the same dense videos."""

    size: tuple[int, int, int]
    steps: int
    stages: list[Stage] = field(default_factory=list)

def pareto_methods(density: float, methods: tuple[str, ...] = METHODS) -> list[Method]:
    """Each of ``methods`` (``auto``, families, peer presets) at ``density``, but ``radial_paper``
    (its decay sets its density) and ``svg2_own`` (SVG2 at its own budget)."""
    return [Method("pareto", name, str(density),
                   SparseAttentionConfig.preset(name, density=density) if name in PRESETS
                   else SparseAttentionConfig(pattern=name, density=density))
            for name in methods if name not in ("radial_paper", "svg2_own")]


def own_budget_methods(methods: tuple[str, ...] = METHODS) -> list[Method]:
    """The peer presets whose own budget is not a density (``radial_paper``, ``svg2_own``: SVG2's
    ``top_p``) among ``methods``, once each."""
    return [Method("pareto", f"{name} (own budget)", "own", SparseAttentionConfig.preset(name))
            for name in ("radial_paper", "svg2") if {"svg2": "svg2_own"}.get(name, name) in methods]


def aging_methods(base: SparseAttentionConfig, steps: int, bounds: tuple[float, ...] = DRIFT_BOUNDS) -> list[Method]:
    """``base`` with plans made once, recalibrated (with a dense pass) every 4 and 2 steps and at
    every sparse step (variants that coincide at this step count appear once); then the per-step
    check of ``recalibrate_error``: recording only (how a plan made once ages), re-planning every
    sparse step from its own queries and keys (the peers' way), and re-planning a layer when its
    error passes each of ``bounds``.

    Example::

        >>> [m.budget for m in aging_methods(SparseAttentionConfig(), 8, bounds=(0.3,))]
        ['recalibrate_at []', 'recalibrate_at [6]', 'recalibrate_at [4, 6]', 'recalibrate_at [2, 3, 4, 5, 6, 7]', 'recalibrate_error inf', 'recalibrate_error 0', 'recalibrate_error 0.3']
    """
    first_sparse = base.num_dense_steps(steps)
    sparse_until = steps - base.dense_last_steps
    methods, seen = [], set()
    for label, every in (("plan once", None), ("every 4 steps", 4), ("every 2 steps", 2), ("every step", 1)):
        at = () if every is None else tuple(range(first_sparse + every, sparse_until, every))
        if every == 1:
            at = tuple(range(first_sparse, sparse_until))
        if at not in seen:
            seen.add(at)
            methods.append(Method("aging", f"recalibrate {label}", f"recalibrate_at {list(at)}",
                                  replace(base, recalibrate_at=at)))
    checked = [("plan once, error checked every step", math.inf), ("re-plan every step, no dense pass", 0.0)]
    for label, bound in checked + [(f"re-plan when error > {bound:g}", bound) for bound in bounds]:
        methods.append(Method("aging", label, f"recalibrate_error {bound:g}", replace(base, recalibrate_error=bound)))
    return methods


def plan_checks(stats: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the ``recalibrate_error`` checks of one method's calls (``SparseRunStats.to_dict()``, one
    per prompt) found: the estimated error of the plan in use at each step, averaged over prompts,
    layers and contexts, its largest layer mean, and the re-plans per call (``None`` without checks).

    Example::

        >>> check = {"step": 3, "mean_error": 0.2, "recalibrated": True}
        >>> plan_checks([{"checks": [check, check | {"mean_error": 0.4}]}, {"checks": [check]}])
        {'error_by_step': {'3': 0.26666666666666666}, 'max_error_by_step': {'3': 0.4}, 'replans_per_call': 1.5}
    """
    checks = [check for call in stats for check in call["checks"]]
    if not checks:
        return None
    by_step: dict[str, list[float]] = {}
    for check in checks:
        by_step.setdefault(str(check["step"]), []).append(check["mean_error"])
    return {"error_by_step": {step: statistics.fmean(errors) for step, errors in by_step.items()},
            "max_error_by_step": {step: max(errors) for step, errors in by_step.items()},
            "replans_per_call": sum(check["recalibrated"] for check in checks) / len(stats)}


def warmup_methods(base: SparseAttentionConfig, steps: int) -> list[Method]:
    """``base`` with each share of dense steps, then with the first layer's density and the last
    step's flipped; variants whose run has no sparse step, or that repeat one, are left out."""
    variants = [(f"{share:.0%} dense steps", replace(base, dense_steps=share)) for share in DENSE_STEP_SHARES]
    first = () if 0 in base.dense_layers else (0, *base.dense_layers)
    variants.append(("first layer " + ("sparse" if first == () else "dense"), replace(base, dense_layers=first)))
    variants.append(("last step " + ("sparse" if base.dense_last_steps else "dense"),
                     replace(base, dense_last_steps=0 if base.dense_last_steps else 1)))
    methods, seen = [], []
    for label, config in variants:
        dense = config.num_dense_steps(steps) + config.dense_last_steps
        schedule = (config.num_dense_steps(steps), config.dense_layers, config.dense_last_steps)
        if dense < steps and schedule not in seen:
            seen.append(schedule)
            methods.append(Method("warmup", label, f"dense steps {config.num_dense_steps(steps)}/{steps}", config))
    return methods


def length_methods(base: SparseAttentionConfig, density: float, smallest_tokens: int) -> list[Method]:
    """``base`` at a fixed ``density`` and at ``alpha * n**C`` keys per query, ``alpha`` matched to
    ``density`` at ``smallest_tokens`` keys: the key blocks ``density`` keeps there (rounded, as
    :class:`~dit_sparse.budget.Budget` rounds it) are ``alpha * n0**C`` keys, a hair under so that
    their rounding up gives the same count.

    Example::

        >>> [round(m.config.alpha * 512 ** m.config.exponent, 3) for m in length_methods(SparseAttentionConfig(), 0.15, 512)[1:]]
        [64.0, 64.0]
    """
    block = base.block_sizes[1]
    blocks = Budget(density=density).blocks_per_row(smallest_tokens, math.ceil(smallest_tokens / block), block)
    methods = [Method("length", f"density {density:g}", f"density {density:g}", replace(base, density=density))]
    for exponent in EXPONENTS:
        alpha = blocks * block / smallest_tokens**exponent * (1 - 1e-9)
        methods.append(Method("length", f"alpha * n^{exponent:g}", f"alpha {alpha:.3g}, C {exponent:g}",
                              replace(base, density=None, alpha=alpha, exponent=exponent)))
    return methods


def video_tokens(size: tuple[int, int, int]) -> int:
    """Video tokens of one self-attention call of the reference model for a ``(frames, height, width)`` video."""
    return ReferenceSizes().video_tokens(*size)


def plan_study(parts: list[str], size: tuple[int, int, int], steps: int, densities: tuple[float, ...],
               length_sizes: list[tuple[int, int, int]], prompts: int, part_prompts: int,
               methods: tuple[str, ...] = METHODS, length_density: float = DEFAULT_DENSITY,
               drift_bounds: tuple[float, ...] = DRIFT_BOUNDS) -> StudyPlan:
    """The stages of ``parts``, most telling first, so that a run cut short still has them: ``auto``
    and the peer presets among ``methods`` at the first density on ``prompts`` prompts; the other
    parts on ``part_prompts`` (the first of them; the aging part's drift trigger at each of
    ``drift_bounds``), the length part with ``length_density`` against
    ``alpha * n**C`` matched to it at the smallest size; the families and the peers' own budgets; the
    length part at every further size; the Pareto methods at each further density.

    Example::

        >>> plan = plan_study(["pareto", "aging"], (29, 128, 128), 16, (0.15, 0.1), [], prompts=16, part_prompts=4)
        >>> [(stage.prompts, len(stage.methods)) for stage in plan.stages]
        [(16, 3), (4, 8), (16, 6), (16, 7)]
    """
    base = SparseAttentionConfig(density=DEFAULT_DENSITY)
    pareto = [pareto_methods(d, methods) for d in densities] if "pareto" in parts else [[]]
    others = (aging_methods(base, steps, drift_bounds) if "aging" in parts else []) + (
        warmup_methods(base, steps) if "warmup" in parts else [])
    smallest = min(video_tokens(s) for s in [size, *length_sizes])
    length = length_methods(base, length_density, smallest) if "length" in parts else []
    headline = [m for m in pareto[0] if m.label in ("auto", *PRESETS)]
    rest = [m for m in pareto[0] if m not in headline] + (own_budget_methods(methods) if "pareto" in parts else [])
    stages = [Stage(size, prompts, headline), Stage(size, part_prompts, others + length), Stage(size, prompts, rest)]
    stages += [Stage(s, part_prompts, length) for s in length_sizes if length and s != size]
    stages += [Stage(size, prompts, methods) for methods in pareto[1:]]
    return StudyPlan(size, steps, [stage for stage in stages if stage.methods])


def run_study(plan: StudyPlan, prompts: list[str], model: Any, warmup: int, repeats: int, seed: int,
              after_stage: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
    """Generate and score every stage of ``plan`` on the first prompts of ``prompts``, one method
    after another; dense videos are made once per size and prompt and reused by every later method
    at that size. Calls ``after_stage`` with the results so far after each method (``other_cores``
    of a size: the most other processes used during any of its methods)."""
    from ..machine import OtherCpuUse, machine_info
    from ..metrics import lpips_status
    from ..results import VBenchScores, build_results, busy_machine_notes
    from ..harness.runner import run_evaluation

    lpips = lpips_status()
    results: dict[str, Any] = {"prompts": prompts, "steps": plan.steps, "main_size": _name(plan.size),
                               "lpips": lpips.reason, "runs": {}}
    dense_runs = {}
    for stage in plan.stages:
        frames, height, width = stage.size
        settings = model.resolve(GenerationSettings(plan.steps, frames, height, width, seed=seed))
        model.check_video_size(settings)
        for config in {_key(m.config): m.config for m in stage.methods}.values():
            with OtherCpuUse() as other:
                run = run_evaluation(model, [config], prompts[: stage.prompts], settings, warmup, repeats,
                                     dense=dense_runs.get(stage.size))
            dense_runs.setdefault(stage.size, run.dense)
            machine = machine_info(model.device) | {"other_cores": other.cores}
            scored = build_results(run, machine, lpips, VBenchScores())
            entry = results["runs"].setdefault(_name(stage.size), {
                "size": list(stage.size), "tokens": video_tokens(stage.size), "dense": scored["dense"],
                "machine": machine, "prompt_adherence": scored["prompt_adherence"], "rows": []})
            entry["machine"]["other_cores"] = max(entry["machine"]["other_cores"], other.cores)
            entry["notes"] = busy_machine_notes(entry["machine"])
            checks = plan_checks([generation.stats for generation in run.sparse[0].generations])
            entry["rows"] += [_row(m, scored["configs"][0], stage.prompts) | ({"checks": checks} if checks else {})
                              for m in stage.methods if _key(m.config) == _key(config)]
            after_stage(results)
    return results


def _name(size: tuple[int, int, int]) -> str:
    return "x".join(map(str, size))


def _key(config: SparseAttentionConfig) -> str:
    return repr(sorted(config.to_dict().items()))


def _row(method: Method, result: dict[str, Any], prompts: int) -> dict[str, Any]:
    agreement = result["detector_agreement"] or {"accuracy": {}, "all": None}
    return {
        "part": method.part, "label": method.label, "budget": method.budget, "config": result["config"],
        "prompts": prompts,
        "density": result["mean_sparse_density"], "psnr": result["fidelity"]["psnr_frame_mean"],
        "ssim": result["fidelity"]["ssim"], "lpips": result["fidelity"]["lpips"],
        "agreement": agreement["accuracy"] | {"all": agreement["all"]},
        "wall_seconds": result["wall_seconds"], "attention_seconds": result["attention_seconds"].get("self", 0.0),
        "speedup": result["speedup"], "attention_speedup": result["self_attention_speedup"],
        "per_prompt_psnr": [f["psnr_frame_mean"] for f in result["per_prompt_fidelity"]],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dit_sparse.eval.studies.fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for fidelity.md, fidelity.json and img/ (docs for the docs copy)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts of the reference model (default 16)")
    parser.add_argument("--part-prompts", type=int, default=None,
                        help="prompts of the aging, warm-up and length parts, the first of --prompts (default: all)")
    parser.add_argument("--size", type=int, nargs=3, default=(29, 128, 128), metavar=("FRAMES", "HEIGHT", "WIDTH"),
                        help="main video size (default: the reference model's 29 128 128)")
    parser.add_argument("--length-sizes", type=int, nargs="+", default=[v for s in LENGTH_SIZES for v in s],
                        metavar="F H W", help="further sizes of the length part, as frame-height-width triples")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps (default 16)")
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES),
                        help="densities of the Pareto part, the first run first (default 0.15 0.1 0.25)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods of the Pareto part (default: all); radial_paper and svg2_own run once, at "
                             "the peers' own budgets")
    parser.add_argument("--drift-bounds", type=float, nargs="+", default=list(DRIFT_BOUNDS),
                        help="recalibrate_error bounds of the aging part's drift trigger (default "
                             f"{' '.join(map(str, DRIFT_BOUNDS))})")
    parser.add_argument("--length-density", type=float, default=DEFAULT_DENSITY,
                        help=f"the fixed density of the length part (default {DEFAULT_DENSITY})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per method (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per prompt and method (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--report-only", action="store_true",
                        help="write fidelity.md and the figures again from OUT/results/fidelity*.json (one per run, "
                             "merged), generating nothing")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, StudyPlan]:
    """Check the flags (``parser.error`` naming the bad one) and plan the study, before any model loads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.part_prompts = args.prompts if args.part_prompts is None else args.part_prompts
    for name in ("prompts", "part_prompts", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.part_prompts > args.prompts:
        parser.error(f"--part-prompts ({args.part_prompts}) takes the first of --prompts ({args.prompts}): give at most that")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not all(0 < d <= 1 for d in [*args.densities, args.length_density]):
        parser.error(f"--densities and --length-density must lie in (0, 1], got {args.densities}, {args.length_density}")
    if not all(bound > 0 for bound in args.drift_bounds):
        parser.error(f"--drift-bounds must be > 0 (0 re-plans every step, a row of its own), got {args.drift_bounds}")
    if len(args.length_sizes) % 3:
        parser.error(f"--length-sizes takes frame-height-width triples, got {len(args.length_sizes)} numbers")
    sizes = [tuple(args.length_sizes[i:i + 3]) for i in range(0, len(args.length_sizes), 3)]
    if "length" in args.parts and not sizes:
        parser.error("the length part needs at least one size besides --size in --length-sizes")
    try:
        plan = plan_study(args.parts, tuple(args.size), args.steps, tuple(args.densities), sizes, args.prompts,
                          args.part_prompts, tuple(args.methods), args.length_density, tuple(args.drift_bounds))
        from ..preflight import check_out_folder, check_sparse_steps

        check_sparse_steps([m.config for stage in plan.stages for m in stage.methods], args.steps)
        check_out_folder(args.out)
    except ValueError as error:
        parser.error(str(error))
    return args, plan


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    from .fidelity_report import write_report

    if args.report_only:
        saved = sorted((args.out / "results").glob("fidelity*.json"))
        if not saved:
            print(f"--report-only reads {args.out / 'results'}/fidelity*.json, and there is none: run the study "
                  f"with --out {args.out} first", file=sys.stderr)
            return 2
        return report_shipped_weights(saved, args.out)
    import torch

    from ..harness.models import load_reference_model
    from ..reference import heldout_prompts, reference_weights_id

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_reference_model(torch.device("cpu"), torch.float32)
    prompts = [prompt for _, prompt in heldout_prompts(args.prompts)]
    command = "python -m dit_sparse.eval.studies.fidelity " + " ".join(argv if argv is not None else sys.argv[1:])
    started = _now()
    weights = reference_weights_id()

    def report(results: dict[str, Any]) -> None:
        done = sum(len(run["rows"]) for run in results["runs"].values())
        total = sum(len(stage.methods) for stage in plan.stages)
        results |= {"command": command, "started": started, "finished": _now(), "methods_done": f"{done} of {total}",
                    "weights": weights}
        print(f"wrote {write_report(results, args.out)} ({done} of {total} methods)", flush=True)

    run_study(plan, prompts, model, args.warmup, args.repeats, args.seed, after_stage=report)
    return 0


def report_shipped_weights(saved: list[Path], out: Path) -> int:
    """``--report-only``: write the page from the saved runs measured on the shipped weights; runs on
    other weights (or with none recorded) are named and left out."""
    from ..reference import reference_weights_id
    from .fidelity_report import merge_results, read_results, write_report

    shipped = reference_weights_id()
    runs = {path: read_results(path) for path in saved}
    other = [f"{path.name} ({results.get('weights', 'weights not recorded')})" for path, results in runs.items()
             if results.get("weights") != shipped]
    current = [results for results in runs.values() if results.get("weights") == shipped]
    if not current:
        print(f"none of the {len(saved)} runs in {out / 'results'} was measured on the shipped weights ({shipped}): "
              f"{', '.join(other)}; run the study again on them", file=sys.stderr)
        return 2
    if other:
        print(f"left out {len(other)} run(s) measured on other weights: {', '.join(other)}")
    print(f"wrote {write_report(merge_results(current), out, save=False)}")
    return 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
