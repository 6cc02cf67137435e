"""The demo's generate logic, free of any UI: one pipeline, its dense baselines cached per
dense-relevant settings, and per request a sparse generation with everything the page shows.

Example::

    >>> session = DemoSession(load_model(None, torch.device("cpu"), torch.float32))          # doctest: +SKIP
    >>> result = session.generate(DemoRequest("a red fox in the snow", pattern="radial", density=0.1))  # doctest: +SKIP
    >>> result.dense_video, result.sparse_video, f"{result.speedup:.2f}x"                   # doctest: +SKIP
    >>> result.masks.figure("layer 2", head=0)                                             # doctest: +SKIP
    >>> session.close()                                                                     # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from dit_sparse import SparseAttentionConfig, SparsePipeline
from dit_sparse.eval.harness.attention_timer import AttentionTimer
from dit_sparse.eval.harness.configs import config_label
from dit_sparse.eval.harness.models import EvalModel, GenerationSettings, output_frames
from dit_sparse.eval.harness.runner import plan_block_masks, timed_call, warmup_settings
from dit_sparse.eval.harness.settings import MAX_SEED, MODEL_PROMPTS
from dit_sparse.eval.harness.sparse_stats import SparseRunSummary, summarize_sparse_run
from dit_sparse.eval.metrics import Fidelity, compare_videos
from dit_sparse.eval.plots import density_figure
from dit_sparse.eval.reference.detector import Reading, detect
from dit_sparse.eval.reference.scoring import agreement
from dit_sparse.eval.videos import write_video

from .dense_cache import DenseCache, DenseKey, DenseRun
from .plan_masks import PlanMasks

def offered_prompts(model: EvalModel) -> list[str]:
    """The prompts the page offers in its menu: for the reference model, held-out examples and every
    combination of its words (:func:`~dit_sparse.eval.reference.prompt_choices`); for any other
    model, the eval's prompt for loaded models."""
    if not model.reads_clips:
        return MODEL_PROMPTS
    from dit_sparse.eval.reference import prompt_choices

    return prompt_choices()


@dataclass(frozen=True)
class DemoRequest:
    """One "Generate". ``None`` takes the model's default (frames, height, width, steps) or the
    session's base configuration (pattern, budget, dense steps).

    Attributes:
        prompt, seed, frames, height, width, steps: what the dense output depends on.
        pattern, density, top_p, dense_steps: the sparse knobs (give at most one of ``density``
            and ``top_p``; ``dense_steps`` a count, or a fraction of the run).
    """

    prompt: str
    seed: int = 0
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    pattern: str | None = None
    density: float | None = None
    top_p: float | None = None
    dense_steps: int | float | None = None


@dataclass(frozen=True)
class DetectorReadings:
    """The clip detector's readings of one dense and sparse pair, and their agreement."""

    dense: Reading
    sparse: Reading
    agreement: float


@dataclass(frozen=True)
class DemoResult:
    """What one "Generate" shows.

    Attributes:
        dense_video, sparse_video: H.264 mp4s of the raw frames.
        dense_seconds, sparse_seconds: wall time of each whole pipeline call; the dense one from
            when that baseline was generated (``dense_from_cache``).
        fidelity: PSNR (per-frame mean and global) and SSIM of the sparse frames against the dense
            ones, on the pipeline's raw frames.
        summary: density per layer and step, FLOPs saved, dense steps, calibration time.
        density_figure: the density per layer and step.
        masks: the plans' block masks, drawn per layer and head on demand.
        readings: what the clip detector reads from the dense and the sparse video (the reference
            model only), and the share of its readings that agree.
    """

    settings: GenerationSettings
    config: SparseAttentionConfig
    dense_video: Path
    sparse_video: Path
    dense_seconds: float
    sparse_seconds: float
    dense_from_cache: bool
    fidelity: Fidelity
    summary: SparseRunSummary
    density_figure: Figure
    masks: PlanMasks
    readings: DetectorReadings | None = None

    @property
    def speedup(self) -> float:
        """Dense wall time over sparse wall time."""
        return self.dense_seconds / self.sparse_seconds


class DemoSession:
    """The demo's one pipeline: generates dense (cached per prompt and settings) and sparse, one
    request at a time, and leaves the pipeline stock between requests, failed ones included.

    Args:
        model: the model to run (see :func:`dit_sparse.eval.harness.models.load_model`).
        fps: frame rate of the written mp4s.
        dense_cache_size: dense baselines kept.
    """

    def __init__(self, model: EvalModel, fps: int = 16, dense_cache_size: int = 4) -> None:
        self._timer = AttentionTimer(model.pipe)  # an unsupported model fails here, not after its first dense run
        self.model = model
        self.fps = fps
        self.base_config = SparseAttentionConfig()
        self.defaults = model.resolve(GenerationSettings())
        self._dense_runs = DenseCache(dense_cache_size)
        self._lock = threading.Lock()
        self._video_dir = Path(tempfile.mkdtemp(prefix="dit-sparse-demo-"))
        self._video_numbers = itertools.count()
        self._last_sparse_video: Path | None = None

    def settings_for(self, request: DemoRequest) -> GenerationSettings:
        """The request's generation settings with the model's defaults filled in; a ``ValueError``
        naming the problem when the model cannot take them."""
        if not request.prompt.strip():
            raise ValueError("the prompt is empty; type what the video should show")
        _check_int("seed", request.seed, minimum=0, maximum=MAX_SEED)
        settings = self.model.resolve(GenerationSettings(request.steps, request.frames, request.height,
                                                         request.width, seed=request.seed))
        for name in ("steps", "frames", "height", "width"):
            if getattr(settings, name) is not None:
                _check_int(name, getattr(settings, name), minimum=1)
        self.model.check_video_size(settings)
        return settings

    def config_for(self, request: DemoRequest, steps: int) -> SparseAttentionConfig:
        """The session's base configuration with the request's sparse knobs; a ``ValueError`` naming
        the problem when they are invalid or leave no step sparse in a run of ``steps``."""
        changes: dict[str, object] = {}
        if request.pattern is not None:
            changes["pattern"] = request.pattern
        if request.density is not None or request.top_p is not None:
            changes |= {"density": request.density, "top_p": request.top_p, "alpha": None}
        if request.dense_steps is not None:
            changes["dense_steps"] = request.dense_steps
        try:
            config = replace(self.base_config, **changes)
        except TypeError as error:
            raise ValueError(str(error)) from None
        if config.num_dense_steps(steps) >= steps:
            raise ValueError(
                f"{config.num_dense_steps(steps)} dense steps of {steps} leave no step sparse; "
                f"use fewer dense steps than steps"
            )
        return config

    def generate(self, request: DemoRequest) -> DemoResult:
        """Dense (from the cache when the prompt and settings match an earlier request) and sparse
        generation of ``request``, their videos, timings, fidelity, density and plan masks."""
        settings = self.settings_for(request)
        config = self.config_for(request, settings.steps)
        with self._lock:
            with self._timer, tqdm(total=2, desc="dense") as phases:
                dense, from_cache = self._dense(request.prompt, settings)
                phases.update()
                phases.set_description("sparse")
                sparse_frames, sparse_seconds, summary, masks = self._sparse(request.prompt, settings, config)
                phases.update()
            fidelity = compare_videos(dense.frames, sparse_frames, with_lpips=False)
            readings = _readings(dense.frames, sparse_frames) if self.model.reads_clips else None
            sparse_video = write_video(sparse_frames, self._new_video_path("sparse"), self.fps)
            if self._last_sparse_video is not None:
                self._last_sparse_video.unlink(missing_ok=True)
            self._last_sparse_video = sparse_video
        return DemoResult(
            settings=settings, config=config, dense_video=dense.video, sparse_video=sparse_video,
            dense_seconds=dense.wall_seconds, sparse_seconds=sparse_seconds, dense_from_cache=from_cache,
            fidelity=fidelity, summary=summary, density_figure=density_figure(summary.density, config_label(config)),
            masks=masks, readings=readings,
        )

    @property
    def prompts(self) -> list[str]:
        """The prompts the page offers (see :func:`offered_prompts`)."""
        return offered_prompts(self.model)

    def warm_up(self) -> None:
        """Pay the one-time costs (lazy initialisation, allocator growth, kernel selection) of the
        dense, calibration and sparse paths with short untimed calls at the default settings, so
        that the first request's timings are steady ones."""
        with self._lock:
            prompt = self.prompts[0]
            self.model.pipe(**self.model.call_kwargs(prompt, warmup_settings(self.defaults, None)))
            pipeline = SparsePipeline(self.model.pipe, self.base_config)
            try:
                pipeline(**self.model.call_kwargs(prompt, warmup_settings(self.defaults, self.base_config)))
            finally:
                pipeline.remove()

    def close(self) -> None:
        """Delete the session's videos."""
        shutil.rmtree(self._video_dir, ignore_errors=True)

    def _dense(self, prompt: str, settings: GenerationSettings) -> tuple[DenseRun, bool]:
        key = DenseKey(prompt, settings)
        cached = self._dense_runs.get(key)
        if cached is not None:
            return cached, True
        output, seconds, _ = timed_call(self.model.pipe, self.model.call_kwargs(prompt, settings), self._timer,
                                        self.model.device)
        frames = output_frames(output)
        run = DenseRun(frames, seconds, write_video(frames, self._new_video_path("dense"), self.fps))
        self._dense_runs.put(key, run)
        return run, False

    def _sparse(
        self, prompt: str, settings: GenerationSettings, config: SparseAttentionConfig
    ) -> tuple[np.ndarray, float, SparseRunSummary, PlanMasks]:
        pipeline = SparsePipeline(self.model.pipe, config)
        try:
            output, seconds, _ = timed_call(pipeline, self.model.call_kwargs(prompt, settings), self._timer,
                                            self.model.device)
            summary = summarize_sparse_run(pipeline.last_stats.to_dict(), self._timer.self_attention_flops())
            masks = PlanMasks.from_run(plan_block_masks(pipeline), summary.plans, config_label(config),
                                       self._timer.layer_names())
        finally:
            pipeline.remove()
        return output_frames(output), seconds, summary, masks

    def _new_video_path(self, kind: str) -> Path:
        return self._video_dir / f"{kind}-{next(self._video_numbers)}.mp4"


def _readings(dense: np.ndarray, sparse: np.ndarray) -> DetectorReadings:
    return DetectorReadings(detect(dense), detect(sparse), agreement([dense], [sparse])["all"])


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be a whole number {bounds}, got {value!r}")
