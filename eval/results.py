"""The evaluation's results as plain data: speed, attention time and FLOPs, calibration, fidelity and
VBench scores per configuration against dense, with the machine and settings they came from.

Per-prompt figures are averaged over prompts (PSNR first per frame, then over frames, then over
prompts, the peers' order); wall and attention times are the median of the timed repeats, averaged
over prompts; speedups are ratios of those averages.

Example::

    >>> results = build_results(run, machine, lpips_status(), vbench_scores)    # doctest: +SKIP
    >>> results["configs"][0]["speedup"], results["configs"][0]["fidelity"]["psnr_frame_mean"]  # doctest: +SKIP
    (2.4, 31.2)
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .harness.runner import EvalRun, VariantRun
from .harness.sparse_stats import summarize_sparse_run
from .metrics import LpipsStatus, compare_videos, mean_over_prompts, temporal_flickering

BUSY_CORES = 0.2  # other processes' average CPU use (in cores) above which timings carry a warning
RANDOM_WEIGHTS_NOTE = (
    "The model has random weights: its fidelity figures test the mechanism (how far sparse attention moves "
    "the output from dense attention), not visual quality."
)


@dataclass
class VBenchScores:
    """VBench figures for every variant: ``scores[variant][dimension]``, who computed
    temporal flickering, and the dimensions skipped with their reasons."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    flicker_source: str = ""
    skipped: dict[str, str] = field(default_factory=dict)


def build_results(run: EvalRun, machine: dict[str, Any], lpips: LpipsStatus, vbench: VBenchScores) -> dict[str, Any]:
    """Everything a report shows, JSON-ready apart from non-finite floats (an ``inf`` PSNR)."""
    dense = _variant_timing(run.dense)
    model = run.model
    results: dict[str, Any] = {
        "model": {
            "name": model.name,
            "random_weights": model.random_weights,
            "offline_spec": model.offline_spec.to_dict() if model.offline_spec else None,
            "self_attention_layers": _layer_names(run.self_attention_layers),
        },
        "notes": ([RANDOM_WEIGHTS_NOTE] if model.random_weights else []) + busy_machine_notes(machine),
        "machine": machine,
        "settings": asdict(run.settings) | {
            "warmup": run.warmup, "repeats": run.repeats, "mask_layer": run.mask_layer,
            "frames_shape": list(run.dense.generations[0].frames.shape),
            "device": str(model.device),
            "dtype": str(model.pipe.transformer.dtype).removeprefix("torch."),
        },
        "prompts": run.prompts,
        "prompt_adherence": _adherence(run),
        "dense": dense | {"vbench": vbench.scores.get(run.dense.name, {})},
        "configs": [],
        "skipped": {"lpips": None if lpips.available else lpips.reason, "vbench": vbench.skipped},
        "temporal_flickering_source": vbench.flicker_source,
    }
    for variant in run.sparse:
        timing = _variant_timing(variant)
        summaries = [summarize_sparse_run(g.stats, run.self_attention_flops) for g in variant.generations]
        fidelity = [compare_videos(d.frames, s.frames, with_lpips=lpips.available)
                    for d, s in zip(run.dense.generations, variant.generations, strict=True)]
        results["configs"].append({
            "name": variant.name,
            "label": variant.label,
            "config": variant.config.to_dict(),
            **timing,
            "speedup": dense["wall_seconds"] / timing["wall_seconds"],
            "self_attention_speedup": _ratio(dense["attention_seconds"]["self"], timing["attention_seconds"]["self"]),
            "calibration_seconds": statistics.fmean(s.calibration_seconds for s in summaries),
            "steps": len(summaries[0].steps),
            "dense_steps": summaries[0].dense_steps,
            "mean_sparse_density": mean_over_prompts([s.mean_sparse_density for s in summaries]),
            "flops_saved_fraction": statistics.fmean(s.flops_saved_fraction for s in summaries),
            "density_per_step_layer": np.mean([s.density for s in summaries], axis=0).tolist(),
            "flops_saved_per_step_layer": np.mean([s.flops_saved for s in summaries], axis=0).tolist(),
            "plans": summaries[0].plans,
            "sparse_head_share": _sparse_head_share(summaries[0].plans),
            "fidelity": {
                metric: mean_over_prompts([getattr(f, metric) for f in fidelity])
                for metric in ("psnr_frame_mean", "psnr_global", "ssim", "lpips")
            },
            "per_prompt_fidelity": [asdict(f) for f in fidelity],
            "detector_agreement": _agreement(run, variant),
            "vbench": vbench.scores.get(variant.name, {}),
        })
    return results


def _sparse_head_share(plans: list[dict[str, Any]]) -> float | None:
    """Share of the planned heads (every layer, context and calibration) given a sparse family."""
    families = [family for plan in plans for family in plan["family"]]
    return sum(family != "dense" for family in families) / len(families) if families else None


def _adherence(run: EvalRun) -> dict[str, Any] | None:
    """What the clip detector reads from the dense videos against what the prompts ask (the
    reference model only)."""
    if not run.model.reads_clips:
        return None
    from .reference.scoring import adherence

    return adherence(run.prompts, [g.frames for g in run.dense.generations])


def _agreement(run: EvalRun, variant: VariantRun) -> dict[str, Any] | None:
    """Whether the detector reads the same from ``variant``'s videos as from the dense ones (the
    reference model only)."""
    if not run.model.reads_clips:
        return None
    from .reference.scoring import agreement

    return agreement([g.frames for g in run.dense.generations], [g.frames for g in variant.generations])


def own_flicker_scores(run: EvalRun) -> dict[str, float]:
    """Temporal flickering of every variant from its raw frames (mean over prompts), for when
    VBench is not installed."""
    variants = [run.dense, *run.sparse]
    return {v.name: statistics.fmean(temporal_flickering(g.frames) for g in v.generations) for v in variants}


def busy_machine_notes(machine: dict[str, Any]) -> list[str]:
    """A warning, with what to do, when other processes used a noticeable share of the CPU during the
    timed runs (``machine["other_cores"]``, see :class:`~dit_sparse.eval.machine.OtherCpuUse`).

    Example::

        >>> busy_machine_notes({"other_cores": 0.05, "cpu_count": 2, "torch_threads": 2})
        []
        >>> print(busy_machine_notes({"other_cores": 1.1, "cpu_count": 2, "torch_threads": 2})[0])
        Other processes used 1.10 of the 2 cores on average during the timed runs: the timings include their contention, and the speedup can be far off (the dense and sparse runs met different loads). Rerun when the other jobs have finished, or with --threads 1 (one core for this run, the rest for the others: steadier timings).
    """
    other = machine.get("other_cores", 0.0)
    if other < BUSY_CORES:
        return []
    note = (f"Other processes used {other:.2f} of the {machine['cpu_count']} cores on average during the timed runs: "
            f"the timings include their contention, and the speedup can be far off (the dense and sparse runs met "
            f"different loads). Rerun when the other jobs have finished")
    if machine["torch_threads"] > 1:
        return [note + ", or with --threads 1 (one core for this run, the rest for the others: steadier timings)."]
    return [note + "."]


def _variant_timing(variant: VariantRun) -> dict[str, Any]:
    gens = variant.generations
    return {
        "wall_seconds": statistics.fmean(g.median_wall_seconds for g in gens),
        "attention_seconds": {kind: statistics.fmean(g.median_attention_seconds(kind) for g in gens)
                              for kind in gens[0].attention_seconds[0]},
        "per_prompt_wall_seconds": [g.wall_seconds for g in gens],
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _layer_names(layers: dict[tuple[str, int], str]) -> dict[str, list[str]]:
    """Per transformer, its self-attention modules in layer order (list index = layer)."""
    names: dict[str, list[str]] = {}
    for (transformer, _), name in sorted(layers.items()):
        names.setdefault(transformer, []).append(name.removeprefix(f"{transformer}."))
    return names
