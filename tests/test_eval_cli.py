import pytest

from dit_sparse import SparseAttentionConfig
from dit_sparse.eval.cli import DEFAULT_PROMPTS, build_parser, request_from_args
from dit_sparse.eval.offline_model import OFFLINE_SPARSE_CONFIG


def _request(argv):
    parser = build_parser()
    return request_from_args(parser.parse_args(argv), parser)


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _request(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_defaults_are_the_offline_model_and_its_sparse_config():
    request = _request([])
    assert request.model is None and request.prompts == DEFAULT_PROMPTS
    assert request.configs == [OFFLINE_SPARSE_CONFIG]
    assert request.device.type in ("cpu", "cuda")


def test_a_loaded_model_defaults_to_the_library_config_and_flags_override_one_field_at_a_time():
    assert _request(["--model", "some/model"]).configs == [SparseAttentionConfig()]
    (config,) = _request(["--model", "some/model", "--densities", "0.2"]).configs
    assert config == SparseAttentionConfig(density=0.2)
    (config,) = _request(["--top-p", "0.9"]).configs
    assert (config.pattern, config.top_p, config.dense_steps) == ("adaptive", 0.9, OFFLINE_SPARSE_CONFIG.dense_steps)


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
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert message in _error(argv, capsys)


def test_an_empty_prompt_file_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing here\n\n")
    assert f"prompt file {empty} has no prompts" in _error(["--prompts", str(empty)], capsys)
