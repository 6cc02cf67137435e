"""Fidelity of a sparse video against the dense one, on the pipeline's raw frames.

Frames are ``(F, H, W, C)`` arrays in ``[0, 1]`` exactly as a diffusers pipeline returns them with
``output_type="np"`` (an image is one frame). Never compare re-decoded mp4s: the codec alone caps
PSNR near 38 dB.

- PSNR, frame mean: PSNR of each frame, averaged over frames (the way SVG and Radial Attention
  report it; identical frames give ``inf``).
- PSNR, global: one PSNR over the mean squared error of the whole video.
- SSIM: 11x11 Gaussian window (sigma 1.5), frames as the batch, averaged over frames.
- LPIPS (AlexNet): averaged over frames, when torchvision and its backbone weights are on disk
  (see :func:`lpips_status`).
- Temporal flickering: VBench's definition, computed here (see :func:`temporal_flickering`).

Example::

    >>> import numpy as np
    >>> video = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    >>> psnr_frame_mean(video, video), ssim(video, video)
    (inf, 1.0)
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import (
    learned_perceptual_image_patch_similarity,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
LPIPS_NET = "alex"


def check_same_video_shape(dense: np.ndarray, sparse: np.ndarray) -> None:
    """Raise a ``ValueError`` that names the difference when two videos cannot be compared frame
    by frame (different frame counts, sizes or channels).

    Example::

        >>> check_same_video_shape(np.zeros((4, 8, 8, 3)), np.zeros((5, 8, 8, 3)))
        Traceback (most recent call last):
        ...
        ValueError: frame counts differ: dense has 4 frames, sparse has 5; generate both with the same --frames
    """
    for name, video in (("dense", dense), ("sparse", sparse)):
        if video.ndim != 4:
            raise ValueError(f"the {name} video must be (frames, height, width, channels), got shape {video.shape}")
    if dense.shape[0] != sparse.shape[0]:
        raise ValueError(
            f"frame counts differ: dense has {dense.shape[0]} frames, sparse has {sparse.shape[0]}; "
            f"generate both with the same --frames"
        )
    if dense.shape[1:] != sparse.shape[1:]:
        raise ValueError(
            f"frame sizes differ: dense frames are {dense.shape[1:]} (H, W, C), sparse frames are "
            f"{sparse.shape[1:]}; generate both with the same --height and --width"
        )


def psnr_frame_mean(dense: np.ndarray, sparse: np.ndarray) -> float:
    """PSNR in dB of each frame on ``[0, 1]``, averaged over frames (``inf`` for identical videos)."""
    target, preds = _frames_pair(dense, sparse)
    per_frame = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return float(per_frame.mean())


def psnr_global(dense: np.ndarray, sparse: np.ndarray) -> float:
    """PSNR in dB of the whole video on ``[0, 1]``: one mean squared error over every pixel."""
    target, preds = _frames_pair(dense, sparse)
    return float(peak_signal_noise_ratio(preds, target, data_range=1.0))


def ssim(dense: np.ndarray, sparse: np.ndarray) -> float:
    """Mean SSIM over frames (11x11 Gaussian window, sigma 1.5, data range 1)."""
    target, preds = _frames_pair(dense, sparse)
    if min(target.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(target.shape[-2:])}"
        )
    value = structural_similarity_index_measure(
        preds, target, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_WINDOW, data_range=1.0
    )
    return float(value)


@dataclass(frozen=True)
class LpipsStatus:
    """Whether LPIPS can run here without downloading anything, and if not, why."""

    available: bool
    reason: str


def lpips_status() -> LpipsStatus:
    """Check, without importing torchvision's models or touching the network, that LPIPS can run:
    torchvision is installed and its AlexNet weights are in the torch hub cache.

    Example::

        >>> status = lpips_status()
        >>> status.available or status.reason.startswith("skipped: ")
        True
    """
    hub_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if importlib.util.find_spec("torchvision") is None:
        return LpipsStatus(
            False,
            "skipped: LPIPS needs torchvision, which is not installed (pip install torchvision), and the "
            f"AlexNet ImageNet weights in {hub_checkpoints}",
        )
    from torchvision.models import AlexNet_Weights

    weights = hub_checkpoints / Path(AlexNet_Weights.DEFAULT.url).name
    if not weights.is_file():
        return LpipsStatus(
            False,
            f"skipped: weights not found at {weights}; put torchvision's AlexNet weights "
            f"({AlexNet_Weights.DEFAULT.url}) there (or set TORCH_HOME) to enable LPIPS",
        )
    return LpipsStatus(True, f"LPIPS ({LPIPS_NET}) with backbone weights from {weights}")


def lpips(dense: np.ndarray, sparse: np.ndarray) -> float:
    """Mean LPIPS (AlexNet) over frames; needs :func:`lpips_status` to be available."""
    status = lpips_status()
    if not status.available:
        raise RuntimeError(status.reason)
    target, preds = _frames_pair(dense, sparse)
    value = learned_perceptual_image_patch_similarity(
        preds.float(), target.float(), net_type=LPIPS_NET, normalize=True
    )
    return float(value)


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench's temporal flickering score of one video, computed here from its definition: frames
    quantised to 8 bits, the mean absolute difference between consecutive frames on the 0-255 scale,
    averaged over frame pairs, mapped to ``(255 - mean) / 255`` (1 = no change between frames).

    Example::

        >>> still = np.full((3, 8, 8, 3), 0.5)
        >>> temporal_flickering(still)
        1.0
    """
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ValueError(f"temporal flickering needs a video of at least 2 frames, got shape {frames.shape}")
    pixels = np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.float32)
    mean_abs_diff = np.abs(np.diff(pixels, axis=0)).mean(axis=(1, 2, 3)).mean()
    return float((255.0 - mean_abs_diff) / 255.0)


@dataclass
class Fidelity:
    """How close a sparse video is to the dense one (``lpips`` is ``None`` when skipped)."""

    psnr_frame_mean: float
    psnr_global: float
    ssim: float
    lpips: float | None


def compare_videos(dense: np.ndarray, sparse: np.ndarray, with_lpips: bool) -> Fidelity:
    """Every fidelity metric of ``sparse`` against ``dense`` (LPIPS only if ``with_lpips``)."""
    check_same_video_shape(dense, sparse)
    return Fidelity(
        psnr_frame_mean=psnr_frame_mean(dense, sparse),
        psnr_global=psnr_global(dense, sparse),
        ssim=ssim(dense, sparse),
        lpips=lpips(dense, sparse) if with_lpips else None,
    )


def mean_over_prompts(values: list[float | None]) -> float | None:
    """Average of per-prompt figures (``None`` if any is missing; an ``inf`` PSNR stays ``inf``)."""
    if not values or any(v is None for v in values):
        return None
    return math.fsum(values) / len(values)


def _frames_pair(dense: np.ndarray, sparse: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    check_same_video_shape(dense, sparse)
    return _frames_tensor(dense), _frames_tensor(sparse)


def _frames_tensor(video: np.ndarray) -> torch.Tensor:
    """``(F, H, W, C)`` frames as a float64 ``(F, C, H, W)`` batch."""
    return torch.from_numpy(np.ascontiguousarray(video, dtype=np.float64)).permute(0, 3, 1, 2)
