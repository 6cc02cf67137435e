"""Generation and timing: the same prompts and seeds, dense and under each sparse configuration.

For every variant (dense first, then each config through :class:`dit_sparse.SparsePipeline`) and
every prompt, the runner times ``repeats`` whole pipeline calls (``time.perf_counter`` around the
call, the device synchronised on both sides: text encoding, every denoising step, VAE decoding and
the conversion to numpy frames), after ``warmup`` untimed calls per variant. A warm-up call is the
same call cut to the first sparse step (the config's dense steps + 1), which is enough to pay every
one-time cost (lazy initialisation, allocator growth, kernel selection) of the dense, calibration and
sparse paths. Attention time comes from :class:`~dit_sparse.eval.harness.attention_timer.AttentionTimer`.

Example::

    >>> run = run_evaluation(model, [SparseAttentionConfig()], ["a red fox"], GenerationSettings(steps=8),
    ...                      warmup=1, repeats=2)                                        # doctest: +SKIP
    >>> run.sparse[0].generations[0].median_wall_seconds                                # doctest: +SKIP
    4.1
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dit_sparse import SparseAttentionConfig, SparsePipeline

from .attention_timer import AttentionTimer
from .configs import config_label, config_slug
from .models import EvalModel, GenerationSettings, output_frames

DENSE = "dense"


@dataclass
class Generation:
    """One variant on one prompt.

    Attributes:
        frames: ``(F, H, W, C)`` frames of the last timed call.
        wall_seconds: wall time of each timed call.
        attention_seconds: per timed call, seconds in self- and cross-attention modules.
        stats: the sparse run statistics of the last timed call (``SparseRunStats.to_dict()``);
            ``None`` for dense.
    """

    frames: np.ndarray
    wall_seconds: list[float]
    attention_seconds: list[dict[str, float]]
    stats: dict[str, Any] | None = None

    @property
    def median_wall_seconds(self) -> float:
        return statistics.median(self.wall_seconds)

    def median_attention_seconds(self, kind: str) -> float:
        return statistics.median(s[kind] for s in self.attention_seconds)


@dataclass
class VariantRun:
    """Dense, or one sparse configuration, over every prompt.

    Attributes:
        name: ``"dense"`` or a file-name-safe config name.
        label: a readable name.
        config: the sparse configuration (``None`` for dense).
        generations: one per prompt, in prompt order.
        block_masks: per ``(transformer, context)``, the ``[H, nQ, nK]`` block mask of the chosen
            layer's plan after the last call (empty for dense).
    """

    name: str
    label: str
    config: SparseAttentionConfig | None
    generations: list[Generation]
    block_masks: dict[tuple[str, str], np.ndarray]


@dataclass
class EvalRun:
    """Everything generated and timed in one evaluation.

    Attributes:
        settings: the generation settings with the model's defaults filled in.
        mask_layer: the self-attention layer whose block masks were kept.
        self_attention_flops: dense FLOPs of one call of each self-attention layer, by
            ``(transformer, layer)``.
        self_attention_layers: each self-attention layer's module name, by ``(transformer, layer)``
            (the numbering of the transformer's :class:`~dit_sparse.pipelines.ModelAdapter`).
    """

    model: EvalModel
    settings: GenerationSettings
    prompts: list[str]
    warmup: int
    repeats: int
    mask_layer: int
    dense: VariantRun
    sparse: list[VariantRun]
    self_attention_flops: dict[tuple[str, int], int]
    self_attention_layers: dict[tuple[str, int], str]


def run_evaluation(
    model: EvalModel,
    configs: list[SparseAttentionConfig],
    prompts: list[str],
    settings: GenerationSettings,
    warmup: int = 1,
    repeats: int = 1,
    plans_dir: Path | None = None,
    mask_layer: int | None = None,
    dense: VariantRun | None = None,
) -> EvalRun:
    """Generate every prompt dense and under each config. Saves each config's plans (if it made any:
    ``pattern="dense"`` makes none) to ``plans_dir/<config name>.safetensors`` when given, and keeps
    the block masks of self-attention layer ``mask_layer`` (default: the middle one) for pictures.
    ``dense``: the dense variant of an earlier run at the same settings whose prompts start with
    ``prompts``, reused instead of generated again."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if not prompts:
        raise ValueError("no prompts to generate")
    timer = AttentionTimer(model.pipe)
    names = timer.layer_names()
    layers = sorted({layer for _, layer in names})
    mask_layer = layers[len(layers) // 2] if mask_layer is None else mask_layer
    if mask_layer not in layers:
        first, last = (next(name for (_, layer), name in names.items() if layer == index) for index in (0, layers[-1]))
        raise ValueError(
            f"--mask-layer {mask_layer} does not exist: the model has self-attention layers 0..{layers[-1]} "
            f"({first} .. {last})"
        )
    model.pipe.set_progress_bar_config(leave=False, position=1)
    if dense is not None and len(dense.generations) < len(prompts):
        raise ValueError(f"the dense run to reuse has {len(dense.generations)} prompts, fewer than {len(prompts)}")
    total = (len(configs) + (dense is None)) * (warmup + repeats * len(prompts))
    with tqdm(total=total, desc="generations", position=0) as bar, timer:
        session = _Session(model, prompts, model.resolve(settings), warmup, repeats, mask_layer, timer, bar)
        if dense is None:
            dense = session.run(DENSE, DENSE, None)
        else:
            dense = replace(dense, generations=dense.generations[: len(prompts)])
        sparse = []
        for index, config in enumerate(configs):
            pipeline = SparsePipeline(model.pipe, config)
            try:
                name = config_slug(index, config)
                sparse.append(session.run(name, config_label(config), pipeline))
                if plans_dir is not None and len(pipeline.controller.plans):
                    plans_dir.mkdir(parents=True, exist_ok=True)
                    pipeline.save_plans(plans_dir / f"{name}.safetensors")
            finally:
                pipeline.remove()
    return EvalRun(model, session.settings, prompts, warmup, repeats, mask_layer, dense, sparse,
                   timer.self_attention_flops(), names)


@dataclass
class _Session:
    """What every variant of one evaluation shares."""

    model: EvalModel
    prompts: list[str]
    settings: GenerationSettings
    warmup: int
    repeats: int
    mask_layer: int
    timer: AttentionTimer
    bar: tqdm

    def run(self, name: str, label: str, pipeline: SparsePipeline | None) -> VariantRun:
        """Warm up, then time every prompt, through ``pipeline`` (``None``: the plain pipeline)."""
        call = self.model.pipe if pipeline is None else pipeline
        config = None if pipeline is None else pipeline.config
        for _ in range(self.warmup):
            self.bar.set_postfix_str(f"{name}: warm-up")
            call(**self.model.call_kwargs(self.prompts[0], warmup_settings(self.settings, config)))
            self.bar.update()
        generations = [self._timed(name, index, call) for index in range(len(self.prompts))]
        masks = {} if pipeline is None else {(transformer, context): mask for (transformer, layer, context), mask
                                             in plan_block_masks(pipeline).items() if layer == self.mask_layer}
        return VariantRun(name, label, config, generations, masks)

    def _timed(self, name: str, index: int, call: Callable[..., Any]) -> Generation:
        walls, attention, output = [], [], None
        for repeat in range(self.repeats):
            self.bar.set_postfix_str(f"{name}: prompt {index + 1}/{len(self.prompts)}, run {repeat + 1}/{self.repeats}")
            kwargs = self.model.call_kwargs(self.prompts[index], self.settings)
            output, wall_seconds, attention_seconds = timed_call(call, kwargs, self.timer, self.model.device)
            walls.append(wall_seconds)
            attention.append(attention_seconds)
            self.bar.update()
        stats = call.last_stats.to_dict() if isinstance(call, SparsePipeline) else None
        return Generation(output_frames(output), walls, attention, stats)


def warmup_settings(settings: GenerationSettings, config: SparseAttentionConfig | None) -> GenerationSettings:
    """``settings`` (resolved) cut to the first sparse step of ``config`` (its dense steps + 1; one
    step for dense, ``config=None``): a call that pays every one-time cost of the paths it times.

    Example::

        >>> settings = GenerationSettings(steps=16)
        >>> warmup_settings(settings, SparseAttentionConfig(dense_steps=2)).steps, warmup_settings(settings, None).steps
        (3, 1)
    """
    steps = 1 if config is None else config.num_dense_steps(settings.steps) + 1
    return replace(settings, steps=min(settings.steps, steps))


def timed_call(
    call: Callable[..., Any], kwargs: dict[str, Any], timer: AttentionTimer, device: torch.device
) -> tuple[Any, float, dict[str, float]]:
    """One pipeline call with ``device`` synchronised on both sides: its output, wall seconds, and
    seconds in self- and cross-attention (``timer`` must be active).

    Example::

        >>> with AttentionTimer(model.pipe) as timer:                             # doctest: +SKIP
        ...     output, wall, attention = timed_call(model.pipe, model.call_kwargs("a fox", settings), timer,
        ...                                          model.device)
    """
    timer.reset()
    _synchronize(device)
    start = time.perf_counter()
    output = call(**kwargs)
    _synchronize(device)
    return output, time.perf_counter() - start, timer.seconds()


def plan_block_masks(pipeline: SparsePipeline) -> dict[tuple[str, int, str], np.ndarray]:
    """The ``[H, nQ, nK]`` block mask (first batch element) of every plan the pipeline holds, by
    ``(transformer, layer, context)``: what the latest call calibrated (or loaded)."""
    return {(key.transformer, key.layer, key.context): entry.plan.to_block_mask()[0].cpu().numpy()
            for key, entry in pipeline.controller.plans.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
