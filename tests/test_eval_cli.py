import json
import subprocess
import sys

import pytest

from dit_sparse import SparseAttentionConfig
from dit_sparse.eval.cli import build_parser, default_prompts, request_from_args
from dit_sparse.eval.reference import heldout_prompts


def _request(argv):
    parser = build_parser()
    return request_from_args(parser.parse_args(argv), parser)


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _request(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_defaults_are_the_reference_model_its_heldout_prompts_and_the_library_config():
    request = _request([])
    assert request.model is None and request.prompts == default_prompts(None, None)
    assert request.prompts == [prompt for _, prompt in heldout_prompts(2)]
    assert request.configs == [SparseAttentionConfig()]
    assert request.device.type in ("cpu", "cuda")
    assert _request(["--heldout", "5"]).prompts == [prompt for _, prompt in heldout_prompts(5)]


def test_heldout_refuses_other_prompts_a_model_and_a_count_below_one(capsys):
    assert "leave out --prompts" in _error(["--heldout", "3", "--prompts", "a red fox"], capsys)
    assert "give --model only for a folder the reference training command wrote" in _error(
        ["--heldout", "3", "--model", "some/model"], capsys)
    assert "--heldout must be >= 1, got 0" in _error(["--heldout", "0"], capsys)


def test_a_folder_the_training_command_wrote_runs_as_the_reference_model(tmp_path, capsys):
    """A retrained folder (model_index.json and training.json, as the shipped one) takes --heldout and
    the held-out prompts by default; a pipeline folder without training.json is any other model."""
    from dit_sparse.eval.reference import reference_model_dir

    folder = str(reference_model_dir())
    assert _request(["--model", folder]).prompts == [prompt for _, prompt in heldout_prompts(2)]
    assert _request(["--model", folder, "--heldout", "4"]).prompts == [prompt for _, prompt in heldout_prompts(4)]
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert default_prompts(str(tmp_path), None) != default_prompts(folder, None)
    assert "give --model only for a folder" in _error(["--model", str(tmp_path), "--heldout", "2"], capsys)


def test_a_loaded_model_defaults_to_the_library_config_and_flags_override_one_field_at_a_time():
    assert _request(["--model", "some/model"]).configs == [SparseAttentionConfig()]
    (config,) = _request(["--model", "some/model", "--densities", "0.2"]).configs
    assert config == SparseAttentionConfig(density=0.2)
    (config,) = _request(["--top-p", "0.9"]).configs
    assert (config.pattern, config.top_p, config.density) == ("auto", 0.9, None)


def test_grid_flags_and_prompt_files(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red fox\n\na cat on the grass\n")
    request = _request(["--prompts", str(prompts), "a third prompt", "--patterns", "radial", "adaptive",
                        "--densities", "0.1", "0.2", "--dense-steps", "2", "0.25", "--dense-layers"])
    assert request.prompts == ["a red fox", "a cat on the grass", "a third prompt"]
    assert len(request.configs) == 8
    assert {c.dense_steps for c in request.configs} == {2, 0.25}
    assert all(c.dense_layers == () for c in request.configs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--configs", "grid.json", "--patterns", "radial"], "either --configs FILE or the grid flags (--patterns)"),
        (["--configs", "missing.yaml"], "config file missing.yaml does not exist"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--dense-steps", "quarter"], "dense steps must be a step count"),
        (["--densities", "1.5"], "density must lie in"),
        (["--vbench", "color"], "need VBench's own prompt suite"),
        (["--vbench", "sharpness"], "unknown VBench dimensions sharpness"),
        (["--patterns", "diagonal"], "invalid choice: 'diagonal'"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--mask-layer", "-1"], "--mask-layer must be >= 0, got -1"),
        (["--seed", "-3"], "--seed must lie in [0, 9223372036854775807], got -3"),
        (["--frames", "30"], "dit-sparse reference Wan (trained, procedural clips) takes 4k+1 frames (1, 5, 9, ...); got 30: "
                             "use 29 or 33"),
        (["--height", "120"], "takes a height that is a multiple of 16 (WanPipeline requires it); got 120: use 112 or 128"),
        (["--width", "8"], "takes a width that is a multiple of 16 (WanPipeline requires it); got 8: use 16"),
        (["--dense-steps", "4", "--steps", "4"], "4 dense steps of 4 leave no step sparse"),
        (["--dense-steps", "16"], "config #0 (auto, density 0.15, dense steps 16, dense layers 0): 16 dense steps "
                                  "of 16 leave no step sparse"),
        (["--dense-steps", "1", "1.0", "--steps", "2"], "config #1 (auto, density 0.15, dense steps 1.0, dense "
                                                        "layers 0): 2 dense steps of 2"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert message in _error(argv, capsys)


def test_an_empty_prompt_file_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing here\n\n")
    assert f"prompt file {empty} has no prompts" in _error(["--prompts", str(empty)], capsys)


def test_a_dense_pattern_baseline_is_not_refused_for_having_no_sparse_step():
    (config,) = _request(["--patterns", "dense", "--dense-steps", "4", "--steps", "4"]).configs
    assert config.pattern == "dense"


def test_an_output_path_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("")
    assert f"output folder {existing} is an existing file" in _error(["--out", str(existing)], capsys)
    below = existing / "eval-out"
    assert f"output folder {below} cannot be created: {existing} is a file" in _error(["--out", str(below)], capsys)
    assert not (tmp_path / "eval-out").exists()


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("configs.yaml", "- {pattern: radial, density: 0.15}\n- {pattern: adaptive, top_p: 0.9\n",
         "configs.yaml, line 3, column 1: not valid YAML (expected ',' or '}'"),
        ("configs.yml", "- pattern: radial\n  density: [0.1\n  dense_steps: 2\n",
         "configs.yml, line 3, column 14: not valid YAML"),
        ("configs.json", '[{"pattern": "radial"},\n {"pattern": "adaptive",}]',
         "configs.json, line 2, column 25: not valid JSON (Expecting property name enclosed in double quotes)"),
    ],
)
def test_a_malformed_config_file_names_the_file_and_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert f"{tmp_path}/{message}" in _error(["--configs", str(path)], capsys)


def _config_only_wan_folder(folder, spatial=8, temporal=4, patch=(1, 2, 2)):
    """A pipeline folder with the config files of a Wan pipeline and no weights: loading it would fail,
    so an error about the video size proves the check ran before loading."""
    for name, config in {
        "model_index.json": {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                             "vae": ["diffusers", "AutoencoderKLWan"]},
        "vae/config.json": {"_class_name": "AutoencoderKLWan", "scale_factor_spatial": spatial,
                            "scale_factor_temporal": temporal},
        "transformer/config.json": {"_class_name": "WanTransformer3DModel", "patch_size": list(patch)},
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frames", "10"], "wan takes 4k+1 frames (1, 5, 9, ...); got 10: use 9 or 13"),
        (["--height", "40"], "takes a height that is a multiple of 16 (its VAE's compression times the patch size); "
                             "got 40: use 32 or 48"),
        (["--dense-steps", "50"], "50 dense steps of 50 leave no step sparse"),          # WanPipeline's default steps
    ],
)
def test_a_local_pipeline_folder_is_checked_before_it_loads(tmp_path, capsys, argv, message):
    folder = _config_only_wan_folder(tmp_path / "wan")
    assert message in _error(["--model", str(folder), *argv], capsys)


def test_a_folder_rule_follows_its_config_files(tmp_path, capsys):
    folder = _config_only_wan_folder(tmp_path / "reference", spatial=4, temporal=4, patch=(1, 1, 1))
    assert "(WanPipeline requires it); got 120: use 112 or 128" in _error(["--model", str(folder), "--height", "120"],
                                                                         capsys)
    request = _request(["--model", str(folder), "--frames", "29", "--height", "128", "--width", "128"])
    assert request.settings.frames == 29


def test_an_unreadable_prompt_file_is_a_clear_error(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(type(prompts), "read_text", refuse)
    assert f"cannot read {prompts}: Permission denied" in _error(["--prompts", str(prompts)], capsys)


def test_a_user_error_ends_with_a_message_not_a_traceback(tmp_path):
    existing = tmp_path / "file"
    existing.write_text("")
    result = subprocess.run([sys.executable, "-m", "dit_sparse.eval", "--out", str(existing)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("is an existing file; give a folder (it is created when missing)")


def test_help_and_argument_checks_import_neither_torch_nor_diffusers():
    code = (
        "import sys\n"
        "from dit_sparse.eval.cli import build_parser, request_from_args\n"
        "parser = build_parser()\n"
        "parser.format_help()\n"
        "try:\n"
        "    request_from_args(parser.parse_args(['--frames', '30']), parser)\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted({'torch', 'diffusers', 'numpy'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
