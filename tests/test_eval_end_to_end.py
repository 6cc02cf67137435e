"""The evaluation CLI end to end on the reference model at a small size: every output written, every
metric computed or skipped with its reason, the clip detector's figures, and unknown words named."""

import contextlib
import io
import json
import math

import imageio.v3 as iio
import pytest

from dit_sparse.eval.cli import main

CLIP_PROMPT = "a red circle moving left on a black background"
SMALL = ["--frames", "9", "--height", "32", "--width", "32", "--steps", "3", "--warmup", "1", "--repeats", "1"]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    configs = out / "configs.yaml"
    configs.write_text(
        "- {pattern: adaptive, density: 0.5, dense_steps: 1, dense_layers: []}\n"
        "- {pattern: dense, dense_steps: 1, dense_layers: []}\n"
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([*SMALL, "--configs", str(configs), "--prompts", CLIP_PROMPT, "a red fox",
                     "--vbench", "motion_smoothness", "--save-plans", "--out", str(out)])
    return code, printed.getvalue(), out, json.loads((out / "results.json").read_text())


def test_the_cli_succeeds_and_prints_the_table(evaluation):
    code, printed, _, _ = evaluation
    assert code == 0
    assert "speedup" in printed and "PSNR frame-mean dB" in printed and "\ndense " in printed
    assert "LPIPS skipped: " in printed and "detector agree" in printed and "prompt adherence" in printed
    assert "prompt 1 has words the model does not know (read as <unk>): fox; it knows: a, and," in printed
    assert "VBench motion_smoothness skipped: " in printed


def test_results_hold_speed_fidelity_and_density_for_every_config(evaluation):
    *_, results = evaluation
    assert not results["model"]["random_weights"]
    assert not any("random weights" in note for note in results["notes"])
    adherence = results["prompt_adherence"]
    assert adherence["checked"] == 1 and [p["unknown_words"] for p in adherence["prompts"]] == [[], ["fox"]]
    assert set(adherence["accuracy"]) == {"background", "colour", "shape", "motion"}
    assert results["settings"]["frames_shape"] == [9, 32, 32, 3]
    assert [c["config"]["pattern"] for c in results["configs"]] == ["adaptive", "dense"]
    assert len(results["dense"]["per_prompt_wall_seconds"]) == 2
    assert all(len(walls) == 1 for walls in results["dense"]["per_prompt_wall_seconds"])
    for config in results["configs"]:
        assert config["speedup"] == pytest.approx(results["dense"]["wall_seconds"] / config["wall_seconds"])
        assert config["attention_seconds"]["self"] > 0
        assert config["steps"] == 3
        density = config["density_per_step_layer"]
        assert len(density) == 3 and len(density[0]) == 4 and density[0] == [1.0] * 4     # step 0 dense
        assert 0.0 < config["fidelity"]["ssim"] <= 1.0 and config["fidelity"]["lpips"] is None
    adaptive, dense_pattern = results["configs"]
    assert adaptive["dense_steps"] == 1 and adaptive["calibration_seconds"] > 0
    assert adaptive["mean_sparse_density"] < 1.0 and 0.0 < adaptive["flops_saved_fraction"] < 1.0
    assert all(0.0 < d < 1.0 for row in adaptive["density_per_step_layer"][1:] for d in row)
    # pattern="dense" keeps every call dense: the output must be the dense baseline's, bit for bit.
    assert dense_pattern["dense_steps"] == 3 and dense_pattern["mean_sparse_density"] is None
    assert dense_pattern["flops_saved_fraction"] == 0.0
    assert dense_pattern["fidelity"]["psnr_frame_mean"] == "inf"
    assert dense_pattern["fidelity"]["ssim"] == pytest.approx(1.0)
    assert dense_pattern["detector_agreement"]["all"] == 1.0       # identical videos read the same
    assert 0.0 <= adaptive["detector_agreement"]["all"] <= 1.0


def test_skipped_metrics_say_why(evaluation):
    *_, results = evaluation
    assert results["skipped"]["lpips"].startswith("skipped: ")
    assert results["skipped"]["vbench"]["motion_smoothness"].startswith("skipped: ")
    variants = [results["dense"], *results["configs"]]
    assert all(0.0 <= v["vbench"]["temporal_flickering"] <= 1.0 for v in variants)
    assert results["temporal_flickering_source"]


def test_videos_plots_plans_and_markdown_are_written(evaluation):
    _, _, out, results = evaluation
    names = ["dense"] + [c["name"] for c in results["configs"]]
    for name in names:
        for prompt in range(2):
            assert iio.imread(out / "videos" / name / f"{prompt}.mp4").shape[0] == 9
    for config in results["configs"]:
        side = iio.imread(out / "videos" / "side_by_side" / config["name"] / "0.mp4")
        assert side.shape[0] == 9 and side.shape[2] > 2 * 32
    assert (out / "plans" / f"{results['configs'][0]['name']}.safetensors").is_file()
    assert not (out / "plans" / f"{results['configs'][1]['name']}.safetensors").exists()   # dense: no plans
    for path in results["outputs"]["plots"].values():
        assert (out / path).is_file() and (out / path).stat().st_size > 0
    assert any("masks_" in path for path in results["outputs"]["plots"].values())
    markdown = (out / "results.md").read_text()
    assert "| dense |" in markdown and "plots/speedup_vs_psnr.png" in markdown
    assert "## Plans: each head's family" in markdown and "of the heads sparse" in markdown
    assert not math.isnan(results["configs"][0]["wall_seconds"])
