"""The frame counts and frame sizes a video model takes, known before the model loads.

Diffusers' video pipelines round a frame count to ``k * temporal compression + 1`` and frame sides to
the VAE's spatial compression times the transformer's patch size (with a warning among the progress
bars), and some refuse sides their ``check_inputs`` does not take (Wan: multiples of 16). A
:class:`VideoSize` holds those rules, read from a loaded pipeline, from a pipeline folder's config
files (nothing loaded), or given directly, and refuses a size with the project's own message naming
the nearest valid values. Nothing here imports torch or diffusers.

Example::

    >>> rules = VideoSize("offline-wan", frame_step=4, side_multiple=(16, 16))
    >>> rules.check(frames=29, height=128, width=128)
    >>> rules.check(frames=30)
    Traceback (most recent call last):
    ...
    ValueError: offline-wan takes 4k+1 frames (1, 5, 9, ...); got 30: use 29 or 33
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Side multiples that diffusers' pipelines require in ``check_inputs`` (an error, not a rounding),
# by the start of the pipeline class name.
PIPELINE_SIDE_RULES = {"Wan": 16, "HunyuanVideo": 16, "CogVideoX": 8, "LTX": 32}


@dataclass(frozen=True)
class VideoSize:
    """What sizes a model takes.

    Attributes:
        name: the model, as messages name it.
        frame_step: frame counts are ``1 + k * frame_step`` (1: any count).
        side_multiple: ``(height, width)`` multiples, or ``None`` when unknown (not checked).
        reason: why the sides must be multiples of these, for the message.
    """

    name: str
    frame_step: int = 1
    side_multiple: tuple[int, int] | None = None
    reason: str = "its VAE's compression times the patch size"

    def check(self, frames: int | None = None, height: int | None = None, width: int | None = None) -> None:
        """Raise a ``ValueError`` naming the nearest valid values when the model would round or refuse
        ``frames``, ``height`` or ``width`` (``None``: not given, not checked)."""
        step = self.frame_step
        if frames is not None and (frames - 1) % step:
            lower = (frames - 1) // step * step + 1
            raise ValueError(
                f"{self.name} takes {step}k+1 frames (1, {1 + step}, {1 + 2 * step}, ...); got {frames}: "
                f"use {lower} or {lower + step}"
            )
        if self.side_multiple is None:
            return
        for side, value, multiple in (("height", height, self.side_multiple[0]), ("width", width, self.side_multiple[1])):
            if value is not None and value % multiple:
                lower = value // multiple * multiple
                nearest = f"{lower} or {lower + multiple}" if lower else str(multiple)
                raise ValueError(
                    f"{self.name} takes a {side} that is a multiple of {multiple} ({self.reason}); got {value}: "
                    f"use {nearest}"
                )

    @classmethod
    def from_parts(
        cls, name: str, pipeline_class: str, temporal: int | None, spatial: int | None, patch: Any
    ) -> VideoSize:
        """The rules of a ``pipeline_class`` pipeline whose VAE compresses ``temporal`` x ``spatial``
        and whose transformer has patch size ``patch`` (an int or ``(t, h, w)``; ``None`` values:
        unknown).

        Example::

            >>> VideoSize.from_parts("tiny", "WanPipeline", 4, 8, (1, 2, 2)).side_multiple
            (16, 16)
            >>> VideoSize.from_parts("tiny", "WanPipeline", 4, 4, (1, 1, 1)).reason
            'WanPipeline requires it'
        """
        rule = next((multiple for prefix, multiple in PIPELINE_SIDE_RULES.items()
                     if pipeline_class.startswith(prefix)), 1)
        if spatial and patch:
            patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)[-2:]
            compression = (spatial * patch_h, spatial * patch_w)
        else:
            compression = (1, 1)
        multiple = (math.lcm(compression[0], rule), math.lcm(compression[1], rule))
        if multiple == (1, 1):
            return cls(name, temporal or 1)
        if multiple == compression:
            reason = "its VAE's compression times the patch size"
        elif multiple == (rule, rule):
            reason = f"{pipeline_class} requires it"
        else:
            reason = f"its VAE's compression times the patch size, {compression}, and {pipeline_class}'s rule of {rule}"
        return cls(name, temporal or 1, multiple, reason)

    @classmethod
    def from_pipeline(cls, pipe: Any, name: str) -> VideoSize:
        """The rules of a loaded diffusers pipeline (its ``vae_scale_factor_*`` attributes and its
        transformer's ``patch_size``)."""
        transformer = getattr(pipe, "transformer", None)
        patch = transformer.config.get("patch_size") if transformer is not None else None
        return cls.from_parts(name, type(pipe).__name__, getattr(pipe, "vae_scale_factor_temporal", None),
                              getattr(pipe, "vae_scale_factor_spatial", None), patch)

    @classmethod
    def from_folder(cls, folder: Path, name: str) -> VideoSize | None:
        """The rules of a pipeline folder written by ``save_pretrained``, from ``model_index.json``,
        ``vae/config.json`` (``scale_factor_spatial``, ``scale_factor_temporal``) and
        ``transformer/config.json`` (``patch_size``), without loading it; ``None`` when the folder
        has no ``model_index.json`` (not a pipeline folder: loading it will say why).

        Example::

            >>> VideoSize.from_folder(Path("my-wan"), "my-wan").check(frames=30)        # doctest: +SKIP
            Traceback (most recent call last):
            ...
            ValueError: my-wan takes 4k+1 frames (1, 5, 9, ...); got 30: use 29 or 33
        """
        index = read_json_config(folder / "model_index.json")
        if index is None:
            return None
        vae = read_json_config(folder / "vae" / "config.json") or {}
        transformer = read_json_config(folder / "transformer" / "config.json") or {}
        temporal = vae.get("scale_factor_temporal", vae.get("temporal_compression_ratio"))
        spatial = vae.get("scale_factor_spatial", vae.get("spatial_compression_ratio"))
        return cls.from_parts(name, str(index.get("_class_name", "")), temporal, spatial, transformer.get("patch_size"))


def read_json_config(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` when there is no such file; a ``ValueError`` naming the
    file and line when it is not valid JSON."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data
