import sys

import numpy as np
import pytest

from dit_sparse.eval import metrics, vbench_bridge
from dit_sparse.eval.videos import write_video

# A stand-in for the vbench package, installed on PYTHONPATH for the subprocess only: it scores
# temporal_flickering from the mp4s with VBench's definition and writes VBench's result file.
FAKE_VBENCH = '''
import json, os
import imageio.v3 as iio
import numpy as np

class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.output_path = output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, prompt_list, dimension_list, local, mode):
        assert mode == "custom_input" and local, (mode, local)
        per_video = []
        for file in sorted(os.listdir(videos_path)):
            frames = iio.imread(os.path.join(videos_path, file)).astype(np.float32)
            score = (255.0 - np.abs(np.diff(frames, axis=0)).mean()) / 255.0
            per_video.append({"video_path": file, "prompt": prompt_list[file], "video_results": float(score)})
        results = {dim: [float(np.mean([v["video_results"] for v in per_video])), per_video] for dim in dimension_list}
        with open(os.path.join(self.output_path, name + "_eval_results.json"), "w") as f:
            json.dump(results, f)
'''


@pytest.fixture
def no_vbench(monkeypatch, tmp_path):
    monkeypatch.delenv(vbench_bridge.PYTHON_ENV, raising=False)
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "weights"))
    monkeypatch.setattr(vbench_bridge.importlib.util, "find_spec", lambda name: None)


@pytest.fixture
def fake_vbench(monkeypatch, tmp_path):
    site = tmp_path / "site"
    (site / "vbench").mkdir(parents=True)
    (site / "vbench" / "__init__.py").write_text(FAKE_VBENCH)
    (site / "vbench-0.0.1.dist-info").mkdir()
    (site / "vbench-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vbench\nVersion: 0.0.1\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv(vbench_bridge.PYTHON_ENV, sys.executable)
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "weights"))
    return tmp_path / "weights"


def test_without_vbench_every_weighted_dimension_is_skipped_and_flickering_is_our_own(no_vbench):
    plan = vbench_bridge.plan_vbench(["motion_smoothness", "subject_consistency"])
    assert plan.python is None and plan.runnable == []
    assert set(plan.skipped) == {"motion_smoothness", "subject_consistency"}
    for reason in plan.skipped.values():
        assert reason.startswith("skipped: vbench is not installed") and "--vbench-python" in reason
    assert plan.flicker_source == vbench_bridge.OWN_FLICKER_SOURCE


def test_an_interpreter_that_cannot_run_is_a_skip_not_a_crash(no_vbench, tmp_path):
    plan = vbench_bridge.plan_vbench(["imaging_quality"], python=str(tmp_path / "no-such-python"))
    assert plan.python is None
    assert plan.skipped["imaging_quality"].startswith("skipped: could not run")


def test_bad_dimension_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown VBench dimensions flicker"):
        vbench_bridge.check_dimensions(["flicker"])
    with pytest.raises(ValueError, match="color need VBench's own prompt suite"):
        vbench_bridge.check_dimensions(["color"])
    assert vbench_bridge.check_dimensions([]) == ["temporal_flickering"]


def test_missing_weights_skip_their_dimension_and_vbench_scores_the_rest(fake_vbench, tmp_path):
    plan = vbench_bridge.plan_vbench(["motion_smoothness"])
    assert plan.version == "0.0.1" and plan.runnable == ["temporal_flickering"]
    missing = fake_vbench / "amt_model" / "amt-s.pth"
    assert plan.skipped["motion_smoothness"].startswith(f"skipped: weights not found at {missing}")

    # A smooth video (brightness ramp) survives H.264 well enough to compare with the raw frames.
    ramp = np.linspace(0.2, 0.6, 9)[:, None, None, None] * np.ones((9, 32, 32, 3))
    folders = {"dense": tmp_path / "videos" / "dense", "c0": tmp_path / "videos" / "c0"}
    write_video(ramp, folders["dense"] / "0.mp4", fps=8)
    write_video(ramp[::-1].copy(), folders["c0"] / "0.mp4", fps=8)
    scores = vbench_bridge.score_folders(plan, folders, {"0.mp4": "a ramp"}, tmp_path / "vbench", device="cpu")
    assert set(scores) == {"dense", "c0"}
    for variant, frames in (("dense", ramp), ("c0", ramp[::-1])):
        assert scores[variant]["temporal_flickering"] == pytest.approx(metrics.temporal_flickering(frames), abs=2e-3)


def test_weights_in_place_make_a_dimension_runnable(fake_vbench):
    for relative in vbench_bridge.WEIGHTS["dynamic_degree"]:
        (fake_vbench / relative).parent.mkdir(parents=True, exist_ok=True)
        (fake_vbench / relative).write_bytes(b"")
    plan = vbench_bridge.plan_vbench(["dynamic_degree"])
    assert plan.runnable == ["dynamic_degree", "temporal_flickering"] and plan.skipped == {}
    assert plan.flicker_source == "vbench 0.0.1 on the mp4s"

