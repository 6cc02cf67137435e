"""One evaluation from request to report: load the model, generate dense and sparse, score, write
videos, plots, ``results.json`` and ``results.md``, and return the results.

Example::

    >>> request = EvalRequest(model=None, prompts=["a red fox"], configs=[SparseAttentionConfig()],
    ...                       settings=GenerationSettings(), out=Path("eval-out"))      # doctest: +SKIP
    >>> results = evaluate(request)                                                   # doctest: +SKIP
    >>> print(format_terminal(results))                                               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from dit_sparse import SparseAttentionConfig

from .harness.models import GenerationSettings, load_model
from .harness.runner import EvalRun, run_evaluation
from .machine import OtherCpuUse, machine_info
from .metrics import lpips_status
from .plots import density_figure, mask_figure, save_figure, speedup_vs_psnr_figure, wall_time_figure
from .preflight import check_before_loading, check_sparse_steps
from .report import write_json, write_markdown
from .results import VBenchScores, build_results, own_flicker_scores
from .vbench_bridge import ALWAYS_RUN, VBenchPlan, plan_vbench, score_folders
from .videos import side_by_side, write_video


@dataclass
class EvalRequest:
    """What to evaluate and where to write it.

    Attributes:
        model: a diffusers model id or directory; ``None`` for the offline default.
        vbench_dimensions: VBench dimensions besides ``temporal_flickering`` (which always runs).
        vbench_python: interpreter that has ``vbench`` (default: see :mod:`~dit_sparse.eval.vbench_bridge`).
        mask_layer: self-attention layer for the block-mask pictures (default: the middle one).
    """

    model: str | None
    prompts: list[str]
    configs: list[SparseAttentionConfig]
    settings: GenerationSettings
    out: Path
    warmup: int = 1
    repeats: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    vbench_dimensions: list[str] = field(default_factory=list)
    vbench_python: str | None = None
    save_plans: bool = False
    mask_layer: int | None = None
    fps: int = 16


def evaluate(request: EvalRequest) -> dict[str, Any]:
    """Run ``request`` and write every output under ``request.out``; returns the results. Bad input is
    a ``ValueError`` naming the problem, before the model loads where it can be
    (:func:`~dit_sparse.eval.preflight.check_before_loading`), else right after."""
    check_before_loading(request.model, request.settings, request.configs, request.out)
    vbench_plan = plan_vbench(request.vbench_dimensions, request.vbench_python)
    lpips = lpips_status()
    model = load_model(request.model, request.device, request.dtype)
    settings = model.resolve(request.settings)
    model.check_video_size(settings)
    if settings.steps is not None:
        check_sparse_steps(request.configs, settings.steps)
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    with OtherCpuUse() as other:
        run = run_evaluation(model, request.configs, request.prompts, request.settings, request.warmup,
                             request.repeats, plans_dir=out / "plans" if request.save_plans else None,
                             mask_layer=request.mask_layer)
    machine = machine_info(request.device) | {"other_cores": other.cores}
    folders = _write_videos(run, out / "videos", request.fps)
    vbench = _vbench_scores(run, vbench_plan, folders, out, request.device)
    results = build_results(run, machine, lpips, vbench)
    plots = _write_plots(run, results, out / "plots")
    results["outputs"] = {
        "videos": {name: str(folder.relative_to(out)) for name, folder in folders.items()},
        "side_by_side": str((out / "videos" / "side_by_side").relative_to(out)),
        "plots": plots,
        "plans": str((out / "plans").relative_to(out)) if request.save_plans else None,
    }
    write_json(results, out / "results.json")
    write_markdown(results, out / "results.md", plots)
    return results


def _write_videos(run: EvalRun, root: Path, fps: int) -> dict[str, Path]:
    """One folder of mp4s per variant (``<prompt index>.mp4``, what VBench scores) and the
    side-by-side videos; returns the per-variant folders."""
    folders = {}
    for variant in [run.dense, *run.sparse]:
        folders[variant.name] = root / variant.name
        for index, generation in enumerate(variant.generations):
            write_video(generation.frames, folders[variant.name] / f"{index}.mp4", fps)
    for variant in run.sparse:
        pairs = zip(run.dense.generations, variant.generations, strict=True)
        for index, (dense, sparse) in enumerate(pairs):
            path = root / "side_by_side" / variant.name / f"{index}.mp4"
            write_video(side_by_side(dense.frames, sparse.frames), path, fps)
    return folders


def _vbench_scores(
    run: EvalRun, plan: VBenchPlan, folders: dict[str, Path], out: Path, device: torch.device
) -> VBenchScores:
    if run.dense.generations[0].frames.shape[0] < 2:
        images = "skipped: the model makes images; VBench scores videos"
        return VBenchScores({}, "", plan.skipped | {dim: images for dim in [*plan.runnable, ALWAYS_RUN]})
    prompts = {f"{index}.mp4": prompt for index, prompt in enumerate(run.prompts)}
    scores = score_folders(plan, folders, prompts, out / "vbench", device.type)
    if ALWAYS_RUN not in plan.runnable:
        for variant, flicker in own_flicker_scores(run).items():
            scores[variant][ALWAYS_RUN] = flicker
    return VBenchScores(scores, plan.flicker_source, dict(plan.skipped))


def overview_figures(results: dict[str, Any]) -> dict[str, tuple[Figure, str]]:
    """The figures over every variant, ``title -> (figure, file name)``: wall time split into
    self-attention and the rest, and with two configs or more (one would be a single dot) speedup
    against PSNR."""
    dense, configs = results["dense"], results["configs"]
    times = [(label, timing["wall_seconds"], timing["attention_seconds"].get("self", 0.0))
             for label, timing in [("dense", dense), *((c["label"], c) for c in configs)]]
    figures = {"wall time, self-attention and the rest": (wall_time_figure(times), "wall_time.png")}
    if len(configs) > 1:
        points = [(c["label"], c["fidelity"]["psnr_frame_mean"], c["speedup"]) for c in configs]
        figures["speedup against PSNR"] = (speedup_vs_psnr_figure(points), "speedup_vs_psnr.png")
    return figures


def _write_plots(run: EvalRun, results: dict[str, Any], root: Path) -> dict[str, str]:
    """Every figure as a PNG under ``root``; returns ``title -> path relative to the output folder``."""
    figures = overview_figures(results)
    for variant, config in zip(run.sparse, results["configs"], strict=True):
        density = np.asarray(config["density_per_step_layer"])
        figures[f"density per layer and step: {variant.label}"] = (
            density_figure(density, variant.label), f"density_{variant.name}.png")
        for (transformer, context), masks in variant.block_masks.items():
            module = run.self_attention_layers[(transformer, run.mask_layer)]
            where = f"{transformer} layer {run.mask_layer} ({module.removeprefix(transformer + '.')}), {context}"
            figures[f"block masks, {variant.label}: {where}"] = (
                mask_figure(masks, f"{variant.label}: {where}"),
                f"masks_{variant.name}_{transformer}_layer{run.mask_layer}_{context}.png")
    written = {title: save_figure(fig, root / name) for title, (fig, name) in figures.items()}
    return {title: str(path.relative_to(root.parent)) for title, path in written.items()}
