import importlib.machinery
import math
import sys
import types

import numpy as np
import pytest

from dit_sparse.eval import metrics


def _video(frames=5, size=32, seed=0):
    # Values in [0.25, 0.75] so that adding noise of up to 0.2 never clips.
    return 0.25 + 0.5 * np.random.default_rng(seed).random((frames, size, size, 3))


def test_identical_videos_give_infinite_psnr_and_unit_ssim():
    video = _video()
    assert metrics.psnr_frame_mean(video, video) == math.inf
    assert metrics.psnr_global(video, video) == math.inf
    assert metrics.ssim(video, video) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_known_noise_matches_the_analytic_value():
    dense = _video(frames=4)
    amplitudes = np.array([0.01, 0.02, 0.05, 0.1])
    signs = np.where(np.random.default_rng(1).random(dense.shape) < 0.5, -1.0, 1.0)
    sparse = dense + signs * amplitudes[:, None, None, None]   # every pixel of frame f is off by exactly a_f

    per_frame = -20 * np.log10(amplitudes)                     # PSNR = 10 log10(1 / a^2) on [0, 1]
    assert metrics.psnr_frame_mean(dense, sparse) == pytest.approx(per_frame.mean(), abs=1e-4)
    assert metrics.psnr_global(dense, sparse) == pytest.approx(10 * np.log10(1 / np.mean(amplitudes**2)), abs=1e-4)
    # The frame mean is not the global PSNR (Jensen): the report must say which.
    assert metrics.psnr_frame_mean(dense, sparse) > metrics.psnr_global(dense, sparse) + 1


def test_ssim_treats_frames_as_a_batch_of_images():
    # Constant frames a and a + c: sigma = 0 everywhere, so SSIM is the luminance term alone,
    # (2 a (a + c) + C1) / (a^2 + (a + c)^2 + C1) with C1 = (0.01 * data_range)^2.
    levels = np.array([0.2, 0.5, 0.8])
    shifts = np.array([0.1, -0.2, 0.05])
    dense = np.broadcast_to(levels[:, None, None, None], (3, 24, 24, 3)).copy()
    sparse = dense + shifts[:, None, None, None]
    c1 = 0.01**2
    expected = (2 * levels * (levels + shifts) + c1) / (levels**2 + (levels + shifts) ** 2 + c1)
    assert metrics.ssim(dense, sparse) == pytest.approx(expected.mean(), abs=1e-6)


def test_mismatched_frame_counts_or_sizes_are_clear_errors():
    video = _video(frames=5, size=32)
    with pytest.raises(ValueError, match="frame counts differ: dense has 5 frames, sparse has 4"):
        metrics.compare_videos(video, video[:4], with_lpips=False)
    with pytest.raises(ValueError, match=r"frame sizes differ.*same --height and --width"):
        metrics.compare_videos(video, video[:, :16], with_lpips=False)
    with pytest.raises(ValueError, match="frame counts differ"):
        metrics.psnr_frame_mean(video, video[:3])


def test_temporal_flickering_follows_vbenchs_definition():
    still = np.full((4, 8, 8, 3), 0.3)
    assert metrics.temporal_flickering(still) == 1.0
    blinking = np.stack([np.zeros((8, 8, 3)), np.ones((8, 8, 3))] * 2)
    assert metrics.temporal_flickering(blinking) == 0.0
    ramp = np.stack([np.full((8, 8, 3), step * 10 / 255) for step in range(5)])   # +10 levels per frame
    assert metrics.temporal_flickering(ramp) == pytest.approx((255 - 10) / 255)
    with pytest.raises(ValueError, match="at least 2 frames"):
        metrics.temporal_flickering(still[:1])


def test_lpips_is_skipped_with_the_missing_package_named(monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    status = metrics.lpips_status()
    assert not status.available
    assert status.reason.startswith("skipped: ") and "torchvision" in status.reason
    with pytest.raises(RuntimeError, match="skipped: "):
        metrics.lpips(_video(), _video())


def test_lpips_is_skipped_with_the_missing_weights_path_named(monkeypatch, tmp_path):
    url = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
    fake = types.ModuleType("torchvision")
    fake.__spec__ = importlib.machinery.ModuleSpec("torchvision", loader=None)
    fake.models = types.SimpleNamespace(AlexNet_Weights=types.SimpleNamespace(DEFAULT=types.SimpleNamespace(url=url)))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake.models)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    status = metrics.lpips_status()
    assert not status.available
    weights = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert f"skipped: weights not found at {weights}" in status.reason

    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert metrics.lpips_status().available
