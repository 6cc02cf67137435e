"""The examples in the docs run as written."""

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def marked_block(path: Path, marker: str) -> str:
    """The fenced code block right after ``<!-- marker -->``."""
    text = path.read_text()
    start = text.index(f"<!-- {marker} -->")
    fence = text.index("```python\n", start) + len("```python\n")
    return text[fence : text.index("```", fence)]


def test_integration_quick_start_runs(one_thread, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(marked_block(DOCS / "integration.md", "integration-example"), namespace)
    stats = namespace["stats"]
    assert stats.sparse_calls > 0 and 0 < stats.mean_sparse_density < 1
    assert (tmp_path / "wan-plans.safetensors").exists()
    assert "self-attention calls sparse" in capsys.readouterr().out


def test_app_python_example_runs(one_thread, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(marked_block(DOCS / "app.md", "app-example"), namespace)
    assert namespace["again"].dense_from_cache and (tmp_path / "mask.png").exists()
    assert "dense from the cache: True" in capsys.readouterr().out
