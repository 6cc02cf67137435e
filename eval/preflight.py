"""What an evaluation checks before it loads a model, so that bad input costs seconds, not a model
load: the output folder, the video size against the model's rules, and that every configuration
leaves at least one step sparse.

The model's rules and default step count come from a local pipeline folder's config files (the
shipped reference model's too) (nothing loaded); a hub model id is checked the same way once it has
loaded (:meth:`~dit_sparse.eval.harness.models.EvalModel.check_video_size` and :func:`check_sparse_steps`).

Example::

    >>> from dit_sparse import SparseAttentionConfig
    >>> check_before_loading(None, GenerationSettings(steps=4), [SparseAttentionConfig(dense_steps=4)], Path("out"))
    Traceback (most recent call last):
    ...
    ValueError: config #0 (auto, density 0.15, dense steps 4, dense layers 0): 4 dense steps of 4 leave no step sparse, so there is no sparse run to measure; use fewer dense steps (--dense-steps) or more steps (--steps)
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from dit_sparse import SparseAttentionConfig

from .harness.configs import config_label
from .harness.settings import GenerationSettings
from .harness.video_size import VideoSize, read_json_config


def check_before_loading(
    model: str | None, settings: GenerationSettings, configs: list[SparseAttentionConfig], out: Path
) -> None:
    """Every check that needs no loaded model: ``out`` can be a folder, and for the reference model
    (``model=None``) or a local pipeline folder, the video size and the sparse steps (with the
    model's default step count where ``settings`` leaves it out). A ``ValueError`` names the problem
    and the fix."""
    check_out_folder(out)
    size, default_steps = model_facts(model)
    if size is not None:
        size.check(settings.frames, settings.height, settings.width)
    steps = settings.steps if settings.steps is not None else default_steps
    if steps is not None:
        check_sparse_steps(configs, steps)


def check_out_folder(out: Path) -> None:
    """A ``ValueError`` when ``out`` cannot be the output folder: it is a file, lies under a file, or
    its nearest existing folder is not writable. Creates nothing.

    Example::

        >>> check_out_folder(Path("/etc/hostname"))                                    # doctest: +SKIP
        Traceback (most recent call last):
        ...
        ValueError: output folder /etc/hostname is an existing file; give a folder (it is created when missing)
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is an existing file; give a folder (it is created when missing)")
    existing = next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"output folder {out} cannot be created: {existing} is a file; give another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {out} cannot be written: no write permission in {existing}; give another folder")


def check_sparse_steps(configs: list[SparseAttentionConfig], steps: int) -> None:
    """A ``ValueError`` naming the first config whose dense steps (leading and trailing) cover all
    ``steps``: its run would be dense, and its "speedup" noise. ``pattern="dense"`` configs, the
    dense-by-design baseline, are allowed.

    Example::

        >>> check_sparse_steps([SparseAttentionConfig(dense_steps=0.25)], steps=4)
    """
    for index, config in enumerate(configs):
        if config.pattern == "dense":
            continue
        dense = config.num_dense_steps(steps) + config.dense_last_steps
        if dense >= steps:
            raise ValueError(
                f"config #{index} ({config_label(config)}): {min(dense, steps)} dense steps of {steps} leave no step "
                f"sparse, so there is no sparse run to measure; use fewer dense steps (--dense-steps) or more steps "
                f"(--steps)"
            )


def model_facts(model: str | None) -> tuple[VideoSize | None, int | None]:
    """The video-size rules and default step count known before loading ``model``: from a local
    pipeline folder's config files and its pipeline class's defaults (``None`` or a folder the
    reference training command wrote: that folder and the reference default steps), else
    ``(None, None)`` (a hub id: checked after loading).

    Example::

        >>> size, steps = model_facts(None)
        >>> size.frame_step, size.side_multiple, steps
        (4, (16, 16), 16)
    """
    from .reference import REFERENCE_MODEL_NAME, reference_call_kwargs, reference_model_dir, runs_as_reference

    if runs_as_reference(model):
        return VideoSize.from_folder(reference_model_dir() if model is None else Path(model), REFERENCE_MODEL_NAME), \
            reference_call_kwargs()["num_inference_steps"]
    folder = Path(model)
    if not folder.is_dir():
        return None, None
    size = VideoSize.from_folder(folder, model)
    return size, _default_steps(folder) if size is not None else None


def _default_steps(folder: Path) -> int | None:
    """The ``num_inference_steps`` default of the pipeline class ``folder/model_index.json`` names
    (``None`` when diffusers has no such class or it sets none)."""
    index = read_json_config(folder / "model_index.json") or {}
    import diffusers

    pipeline = getattr(diffusers, str(index.get("_class_name", "")), None)
    if pipeline is None:
        return None
    parameter = inspect.signature(pipeline.__call__).parameters.get("num_inference_steps")
    default = None if parameter is None else parameter.default
    return default if isinstance(default, int) and not isinstance(default, bool) else None
