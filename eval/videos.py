"""Writing the evaluation's videos: H.264 mp4s through diffusers' ``export_to_video`` (imageio-ffmpeg),
and dense | sparse side by side, each side under a band that names it.

Example::

    >>> import numpy as np
    >>> frames = np.zeros((9, 32, 48, 3), dtype=np.float32)
    >>> side_by_side(frames, frames).shape
    (9, 48, 112, 3)
    >>> write_video(frames, Path("/tmp/dense.mp4"), fps=16)            # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import check_same_video_shape

SEPARATOR_PX = 16  # keeps 2W + bar a multiple of 16 (H.264 macro blocks) when W is a multiple of 8
LABEL_PX = 16  # the band above each side that names it; keeps H + band a multiple of 16 when H is one
LABEL_FONT_PX = 12  # the label's font size, smaller when a side is too narrow for it


def write_video(frames: np.ndarray, path: Path, fps: int) -> Path:
    """Write ``(F, H, W, C)`` frames in ``[0, 1]`` as a browser-playable mp4 at ``path``."""
    from diffusers.utils import export_to_video

    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(np.clip(frames, 0.0, 1.0)), str(path), fps=fps)
    return path


def side_by_side(dense: np.ndarray, sparse: np.ndarray, labels: tuple[str, str] = ("dense", "sparse")) -> np.ndarray:
    """Dense on the left, sparse on the right, a white bar between them, each side under a white band
    naming it (``labels``)."""
    check_same_video_shape(dense, sparse)
    frames, height, width, channels = dense.shape
    sides = [np.concatenate([np.broadcast_to(label_band(label, width, channels, dense.dtype), (frames, LABEL_PX,
                                                                                                  width, channels)),
                             video], axis=1)
             for label, video in zip(labels, (dense, sparse), strict=True)]
    bar = np.ones((frames, LABEL_PX + height, SEPARATOR_PX, channels), dtype=dense.dtype)
    return np.concatenate([sides[0], bar, sides[1]], axis=2)


def label_band(text: str, width: int, channels: int = 3, dtype: np.dtype = np.float32) -> np.ndarray:
    """A ``(LABEL_PX, width, channels)`` band in ``[0, 1]``: ``text`` in black, centred on white, in
    Pillow's default font (shrunk to fit ``width``).

    Example::

        >>> band = label_band("dense", 64)
        >>> band.shape, float(band.min()) < 0.5 < float(band.max())
        ((16, 64, 3), True)
    """
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (width, LABEL_PX), 255)
    draw = ImageDraw.Draw(image)
    for size in range(LABEL_FONT_PX, 5, -1):
        font = ImageFont.load_default(size=size)
        if draw.textlength(text, font=font) <= width - 2:
            break
    draw.text((width / 2, LABEL_PX / 2), text, fill=0, font=font, anchor="mm")
    band = np.asarray(image, dtype=dtype) / 255.0
    return np.repeat(band[:, :, None], channels, axis=2)
