"""Writing the evaluation's videos: H.264 mp4s through diffusers' ``export_to_video`` (imageio-ffmpeg),
and dense | sparse side by side.

Example::

    >>> import numpy as np
    >>> frames = np.zeros((9, 32, 48, 3), dtype=np.float32)
    >>> side_by_side(frames, frames).shape
    (9, 32, 112, 3)
    >>> write_video(frames, Path("/tmp/dense.mp4"), fps=16)            # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import check_same_video_shape

SEPARATOR_PX = 16  # keeps 2W + bar a multiple of 16 (H.264 macro blocks) when W is a multiple of 8


def write_video(frames: np.ndarray, path: Path, fps: int) -> Path:
    """Write ``(F, H, W, C)`` frames in ``[0, 1]`` as a browser-playable mp4 at ``path``."""
    from diffusers.utils import export_to_video

    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(np.clip(frames, 0.0, 1.0)), str(path), fps=fps)
    return path


def side_by_side(dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """Dense on the left, sparse on the right, a white bar between them."""
    check_same_video_shape(dense, sparse)
    frames, height, _, channels = dense.shape
    bar = np.ones((frames, height, SEPARATOR_PX, channels), dtype=dense.dtype)
    return np.concatenate([dense, bar, sparse], axis=2)
