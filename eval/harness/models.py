"""The model an evaluation runs: the shipped reference model (the default), any diffusers pipeline, or
the random offline Wan of the unit tests, and how to call it.

Example::

    >>> model = load_model(None, torch.device("cpu"), torch.float32)          # doctest: +SKIP
    >>> settings = GenerationSettings(steps=4, frames=9, height=32, width=32)
    >>> kwargs = model.call_kwargs("a red fox", settings)                     # doctest: +SKIP
    >>> video = output_frames(model.pipe(**kwargs))                           # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .offline_model import OFFLINE_MODEL_NAME, OfflineWanSpec, build_offline_pipeline, offline_prompt_embeds
from .settings import DTYPE_NAMES, GenerationSettings
from .video_size import VideoSize

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class EvalModel:
    """A loaded pipeline and what the evaluation needs to know about it.

    Attributes:
        pipe: the diffusers pipeline.
        name: the model id, directory, or the offline model's name.
        random_weights: whether its weights are random (the offline default).
        offline_spec: the offline model's sizes (``None`` for a loaded model).
        defaults: generation settings the model brings (the reference model's
            :func:`~dit_sparse.eval.reference.reference_call_kwargs`, the offline model's sizes; for a
            loaded pipeline the defaults of its ``__call__``: steps, frames, height, width).
        reads_clips: whether the clip detector can read its videos (the reference model): the
            evaluation then reports prompt adherence and sparse-vs-dense detector agreement.
        call_extras: further keyword arguments of every pipeline call (the reference model's
            ``max_sequence_length``).
    """

    pipe: Any
    name: str
    random_weights: bool
    offline_spec: OfflineWanSpec | None = None
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    reads_clips: bool = False
    call_extras: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where the denoiser runs."""
        return self.pipe.transformer.device

    @property
    def makes_video(self) -> bool:
        return "num_frames" in inspect.signature(self.pipe.__call__).parameters

    def resolve(self, settings: GenerationSettings) -> GenerationSettings:
        """``settings`` with the model's defaults filled in where ``settings`` leaves ``None``."""
        names = ("steps", "frames", "height", "width", "guidance_scale")
        filled = {name: getattr(self.defaults, name) for name in names if getattr(settings, name) is None}
        return replace(settings, **filled)

    @property
    def frame_step(self) -> int:
        """Frame counts the model takes are ``1 + k * frame_step``: its VAE's temporal compression
        (1 for a pipeline that does not say)."""
        return getattr(self.pipe, "vae_scale_factor_temporal", None) or 1

    def check_video_size(self, settings: GenerationSettings) -> None:
        """Raise a ``ValueError`` naming the nearest valid values when the pipeline would silently round
        or refuse the frame count or the frame size of ``settings`` (see
        :class:`~dit_sparse.eval.harness.video_size.VideoSize`).

        Example::

            >>> model.check_video_size(GenerationSettings(frames=30))                 # doctest: +SKIP
            Traceback (most recent call last):
            ...
            ValueError: offline-wan (random weights) takes 4k+1 frames (1, 5, 9, ...); got 30: use 29 or 33
        """
        VideoSize.from_pipeline(self.pipe, self.name).check(settings.frames, settings.height, settings.width)

    def call_kwargs(self, prompt: str, settings: GenerationSettings) -> dict[str, Any]:
        """Keyword arguments of one pipeline call: raw ``np`` frames, seeded noise."""
        settings = self.resolve(settings)
        if settings.frames is not None and not self.makes_video:
            raise ValueError(f"{self.name} makes images; --frames applies to video pipelines only")
        kwargs: dict[str, Any] = {
            "output_type": "np",
            "generator": torch.Generator().manual_seed(settings.seed),
            **self._prompt_inputs(prompt, settings),
            **self.call_extras,
        }
        optional = {"num_inference_steps": settings.steps, "num_frames": settings.frames, "height": settings.height,
                    "width": settings.width, "guidance_scale": settings.guidance_scale}
        kwargs.update({name: value for name, value in optional.items() if value is not None})
        return kwargs

    def _prompt_inputs(self, prompt: str, settings: GenerationSettings) -> dict[str, Any]:
        if self.offline_spec is None:
            return {"prompt": prompt}
        texts = {"prompt_embeds": prompt}
        if settings.guidance_scale is not None and settings.guidance_scale > 1.0:
            texts["negative_prompt_embeds"] = ""
        device, dtype = self.device, self.pipe.transformer.dtype
        return {name: offline_prompt_embeds(text, self.offline_spec, settings.seed).to(device, dtype)
                for name, text in texts.items()}


def pick_device(name: str | None) -> torch.device:
    """The device called ``name`` (``cuda``, ``cuda:1``, ``cpu``); ``None`` picks CUDA when available.

    Example::

        >>> pick_device("cpu")
        device(type='cpu')
    """
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device {name}: {error}; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype called ``name`` (a key of :data:`DTYPES`); ``None`` picks bfloat16 on CUDA and
    float32 elsewhere.

    Example::

        >>> pick_dtype(None, torch.device("cpu"))
        torch.float32
    """
    return DTYPES[name or ("bfloat16" if device.type == "cuda" else "float32")]


def load_offline_model(spec: OfflineWanSpec, device: torch.device, dtype: torch.dtype) -> EvalModel:
    """The offline random Wan pipeline of sizes ``spec`` (its default settings from ``spec``), on
    ``device`` in ``dtype``.

    Example::

        >>> tiny = load_offline_model(OfflineWanSpec(num_layers=2, frames=5, height=32, width=32, steps=3),
        ...                           torch.device("cpu"), torch.float32)          # doctest: +SKIP
    """
    pipe = build_offline_pipeline(spec).to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    defaults = GenerationSettings(spec.steps, spec.frames, spec.height, spec.width, spec.guidance_scale)
    return EvalModel(pipe, OFFLINE_MODEL_NAME, random_weights=True, offline_spec=spec, defaults=defaults)


def load_reference_model(device: torch.device, dtype: torch.dtype, folder: Path | None = None) -> EvalModel:
    """The shipped reference model, or the folder ``folder`` the reference training command wrote,
    loaded with the stock ``WanPipeline.from_pretrained``, with the reference default generation
    settings.

    Example::

        >>> model = load_reference_model(torch.device("cpu"), torch.float32)
        >>> model.defaults.frames, model.defaults.height, model.reads_clips
        (29, 128, True)
    """
    from diffusers import WanPipeline

    from ..reference import REFERENCE_MODEL_NAME, reference_call_kwargs, reference_model_dir

    pipe = WanPipeline.from_pretrained(folder or reference_model_dir(), torch_dtype=dtype).to(device)
    kwargs = reference_call_kwargs()
    defaults = GenerationSettings(kwargs["num_inference_steps"], kwargs["num_frames"], kwargs["height"],
                                  kwargs["width"], kwargs["guidance_scale"])
    name = REFERENCE_MODEL_NAME if folder is None else f"{REFERENCE_MODEL_NAME}, trained into {folder}"
    return EvalModel(pipe, name, random_weights=False, defaults=defaults, reads_clips=True,
                     call_extras={"max_sequence_length": kwargs["max_sequence_length"]})


def load_model(model: str | None, device: torch.device, dtype: torch.dtype) -> EvalModel:
    """The reference model (``model=None``, or a folder its training command wrote) or a diffusers
    pipeline by model id or local directory, on ``device`` in ``dtype``."""
    from ..reference import runs_as_reference

    if runs_as_reference(model):
        return load_reference_model(device, dtype, None if model is None else Path(model))

    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        where = "a local directory" if Path(model).exists() else "a model id"
        raise ValueError(
            f"could not load {model!r} ({where}) with DiffusionPipeline.from_pretrained: {error}. Give a diffusers "
            f"model id (downloaded or cached) or a directory written by save_pretrained, or leave --model out "
            f"for the reference model"
        ) from error
    pipe = pipe.to(device)
    parameters = inspect.signature(pipe.__call__).parameters
    defaults = GenerationSettings(*(_default_of(parameters.get(name))
                                    for name in ("num_inference_steps", "num_frames", "height", "width")))
    return EvalModel(pipe, model, random_weights=False, defaults=defaults)


def _default_of(parameter: inspect.Parameter | None) -> Any:
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def output_frames(output: Any) -> np.ndarray:
    """The first video of a pipeline output as ``(F, H, W, C)`` float32 in ``[0, 1]`` (an image
    pipeline's output is one frame)."""
    if hasattr(output, "frames"):
        video = np.asarray(output.frames[0], dtype=np.float32)
    elif hasattr(output, "images"):
        video = np.asarray(output.images[0], dtype=np.float32)[None]
    else:
        raise TypeError(f"cannot find frames in a {type(output).__name__}; expected .frames (video) or .images")
    if video.ndim != 4:
        raise ValueError(f"expected (frames, height, width, channels) from output_type='np', got shape {video.shape}")
    return video
