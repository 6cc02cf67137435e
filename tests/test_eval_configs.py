import json

import pytest

from dit_sparse import SparseAttentionConfig
from dit_sparse.eval.harness.configs import config_grid, config_slug, load_config_file, parse_dense_steps


def test_grid_is_patterns_by_budgets_by_dense_steps():
    patterns, budgets, steps = ("radial", "adaptive"), ((0.1, None), (0.2, None), (None, 0.9)), (2, 0.25)
    grid = config_grid(list(patterns), densities=[0.1, 0.2], top_ps=[0.9], dense_steps=list(steps), dense_layers=())
    assert len(grid) == 2 * 3 * 2
    assert {(c.pattern, c.density, c.top_p, c.dense_steps) for c in grid} == {
        (p, d, t, s) for p in patterns for d, t in budgets for s in steps
    }
    assert all(c.dense_layers == () for c in grid)
    assert len({config_slug(i, c) for i, c in enumerate(grid)}) == len(grid)


def test_dense_steps_are_counts_or_fractions():
    assert parse_dense_steps("2") == 2 and isinstance(parse_dense_steps("2"), int)
    assert parse_dense_steps("0.25") == 0.25
    with pytest.raises(ValueError, match="step count"):
        parse_dense_steps("quarter")


def test_an_empty_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one pattern, one budget"):
        config_grid(["radial"], densities=[], top_ps=[], dense_steps=[0.25])


def test_json_and_yaml_files_give_validated_configs(tmp_path):
    entries = [{"pattern": "radial", "density": 0.1, "dense_steps": 2}, {"pattern": "adaptive", "top_p": 0.9}]
    (tmp_path / "grid.json").write_text(json.dumps(entries))
    (tmp_path / "grid.yaml").write_text(
        "configs:\n  - {pattern: radial, density: 0.1, dense_steps: 2}\n  - {pattern: adaptive, top_p: 0.9}\n"
    )
    expected = [SparseAttentionConfig.from_dict(e) for e in entries]
    assert load_config_file(tmp_path / "grid.json") == expected
    assert load_config_file(tmp_path / "grid.yaml") == expected


def test_bad_config_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"pattern": "radial"}, {"pattern": "radial", "density": 3}]))
    with pytest.raises(ValueError, match=r"bad.json, config #1: density must lie in"):
        load_config_file(bad)
    bad.write_text(json.dumps([{"pattern": "radial", "sparsity": 0.9}]))
    with pytest.raises(ValueError, match="config #0: unknown SparseAttentionConfig fields: sparsity"):
        load_config_file(bad)
    bad.write_text(json.dumps({"pattern": "radial"}))
    with pytest.raises(ValueError, match="non-empty list"):
        load_config_file(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "grid.toml").write_text("")
    with pytest.raises(ValueError, match=r"must end in .json, .yaml or .yml"):
        load_config_file(tmp_path / "grid.toml")
