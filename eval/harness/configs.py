"""The sparse configurations an evaluation compares: a grid (patterns x budgets x dense steps) or a
JSON/YAML file of :class:`~dit_sparse.SparseAttentionConfig` dicts.

Example::

    >>> grid = config_grid(["radial", "adaptive"], densities=[0.1, 0.15], top_ps=[], dense_steps=[0.25])
    >>> [config_label(c) for c in grid][:2]
    ['radial, density 0.1, dense steps 0.25, dense layers 0', 'radial, density 0.15, dense steps 0.25, dense layers 0']
    >>> config_slug(0, grid[0])
    'c0-radial-density0.1-ds0.25'
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path
from typing import Any

from dit_sparse import SparseAttentionConfig


def parse_dense_steps(text: str) -> int | float:
    """``"2"`` -> 2 steps, ``"0.25"`` -> a quarter of the run."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"dense steps must be a step count (2) or a fraction of the run (0.25), got {text!r}"
        ) from None


def config_grid(
    patterns: list[str],
    densities: list[float],
    top_ps: list[float],
    dense_steps: list[int | float],
    dense_layers: tuple[int, ...] | None = None,
) -> list[SparseAttentionConfig]:
    """Every combination of pattern, budget (each density, then each top-p) and dense-step setting.
    ``dense_layers`` ``None`` keeps the config's default."""
    budgets = [{"density": d} for d in densities] + [{"top_p": p} for p in top_ps]
    if not patterns or not budgets or not dense_steps:
        raise ValueError(
            "a config grid needs at least one pattern, one budget (--densities or --top-p) and one --dense-steps"
        )
    extra = {} if dense_layers is None else {"dense_layers": dense_layers}
    return [SparseAttentionConfig(pattern=pattern, dense_steps=steps, **budget, **extra)
            for pattern, budget, steps in product(patterns, budgets, dense_steps)]


def load_config_file(path: Path) -> list[SparseAttentionConfig]:
    """Configs from a JSON or YAML file holding a list of config dicts (or ``{"configs": [...]}``).
    A file that does not parse is a ``ValueError`` naming the file, the line and the column.

    Example::

        >>> load_config_file(Path("configs.yaml"))                                      # doctest: +SKIP
        Traceback (most recent call last):
        ...
        ValueError: configs.yaml, line 3, column 1: not valid YAML (expected ',' or '}', but got '<stream end>')
    """
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist" if not path.exists() else f"config file {path} is not a file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        data: Any = _parse_yaml(text, path)
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") from None
    else:
        raise ValueError(f"config file {path} must end in .json, .yaml or .yml")
    if isinstance(data, dict) and "configs" in data:
        data = data["configs"]
    if not isinstance(data, list) or not data or not all(isinstance(entry, dict) for entry in data):
        raise ValueError(f"{path} must hold a non-empty list of SparseAttentionConfig dicts (or {{'configs': [...]}})")
    configs = []
    for index, entry in enumerate(data):
        try:
            configs.append(SparseAttentionConfig.from_dict(entry))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}, config #{index}: {error}") from error
    return configs


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{path}{where}: not valid YAML ({problem})") from None


def config_label(config: SparseAttentionConfig) -> str:
    """A short human-readable name: pattern, budget, dense steps and layers."""
    layers = ",".join(map(str, config.dense_layers)) or "none"
    return f"{config.pattern}, {_budget(config)}, dense steps {config.dense_steps}, dense layers {layers}"


def config_slug(index: int, config: SparseAttentionConfig) -> str:
    """A file-name-safe, unique (by ``index``) name for outputs."""
    return f"c{index}-{config.pattern}-{_budget(config).replace(' ', '')}-ds{config.dense_steps}"


def _budget(config: SparseAttentionConfig) -> str:
    if config.top_p is not None:
        return f"top_p {config.top_p}"
    if config.alpha is not None:
        return f"alpha {config.alpha} n^{config.exponent}"
    return f"density {config.density}"
