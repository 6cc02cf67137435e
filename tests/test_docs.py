"""Every code block in README.md and docs/*.md runs as written, or says why not.

A block is marked by the HTML comments on the lines right above its fence:

- ``<!-- needs: REASON -->``: not run here (a GPU, downloaded weights, network access, minutes of
  CPU); every ``bash`` block needs one, and its ``dit-sparse`` commands must name flags that exist.
- ``<!-- continues -->``: a ``python`` block that runs after the previous one, in its namespace.
- any other name (``<!-- app-example -->``): a handle for the checks below.

Every other ``python`` block runs, in a temporary folder; ``yaml`` blocks are example config files
and must load; ``text`` blocks are output or pictures. A fence without a language fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "yaml", "text"}
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")
COMMANDS = {"dit-sparse-eval": "dit_sparse.eval.cli", "dit-sparse-demo": "dit_sparse.app.cli"}


@dataclass
class Block:
    path: Path
    line: int
    language: str
    code: str
    markers: list[str]
    previous: Block | None  # the python block before it in the same file

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def needs(self) -> str | None:
        return next((m.split(":", 1)[1].strip() for m in self.markers if m.startswith("needs:")), None)


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` with the marker comments right above each fence."""
    lines = path.read_text().splitlines()
    blocks, previous, index = [], None, 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        markers, above = [], index - 1
        while above >= 0 and MARKER.match(lines[above]):
            markers.insert(0, MARKER.match(lines[above]).group(1))
            above -= 1
        block = Block(path, index + 1, fence.group(1), "\n".join(lines[index + 1 : end]) + "\n", markers, previous)
        blocks.append(block)
        if block.language == "python":
            previous = block
        index = end + 1
    return blocks


BLOCKS = [block for path in FILES for block in read_blocks(path)]


def _blocks(language: str, run: bool | None = None) -> list:
    chosen = [b for b in BLOCKS if b.language == language and (run is None or (b.needs is None) == run)]
    return [pytest.param(b, id=b.name) for b in chosen]


def test_every_block_has_a_language_and_every_unrun_block_says_why():
    for block in BLOCKS:
        assert block.language in LANGUAGES, f"{block.name}: fence language {block.language!r}, not one of {LANGUAGES}"
        if block.language == "bash":
            assert block.needs, f"{block.name}: a bash block needs a <!-- needs: REASON --> comment above its fence"
        if block.needs is not None:
            assert block.needs, f"{block.name}: <!-- needs: --> without a reason"
        if "continues" in block.markers:
            assert block.previous is not None and block.previous.needs is None, f"{block.name} continues no runnable block"


def _run(block: Block, namespace: dict) -> None:
    if "continues" in block.markers:
        _run(block.previous, namespace)
    if "dit_sparse.kernels" in block.code and "_triton" in block.code:
        pytest.importorskip("triton", reason="the kernel examples need triton: pip install -e '.[gpu]'")
    exec(compile(block.code, block.name, "exec"), namespace)


@pytest.mark.parametrize("block", _blocks("python", run=True))
def test_python_block_runs(block, one_thread, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    _run(block, namespace)
    for marker in block.markers:
        if marker in CHECKS:
            CHECKS[marker](namespace, tmp_path, capsys.readouterr().out)


@pytest.mark.parametrize("block", _blocks("yaml"))
def test_yaml_block_is_a_config_file_that_loads(block, tmp_path):
    from dit_sparse.eval.harness.configs import load_config_file

    path = tmp_path / "configs.yaml"
    path.write_text(block.code)
    assert load_config_file(path)


@pytest.mark.parametrize("block", _blocks("bash"))
def test_commands_name_modules_and_flags_that_exist(block):
    for line in block.code.replace("\\\n", " ").splitlines():
        for command in re.split(r"&&|;", line.split(" #")[0]):
            words = shlex.split(command)
            if words[:2] == ["python", "-m"] and words[2].startswith("dit_sparse"):
                module, flags = words[2], words[3:]
            elif words and words[0] in COMMANDS:
                module, flags = COMMANDS[words[0]], words[1:]
            else:
                continue
            spec = importlib.util.find_spec(module)
            assert spec is not None, f"{block.name}: no module {module}"
            if spec.submodule_search_locations:  # a package: python -m runs its __main__, which runs its cli
                folder = Path(spec.origin).parent
                source = "".join((folder / name).read_text() for name in ("__main__.py", "cli.py"))
            else:
                source = Path(spec.origin).read_text()
            for flag in (word for word in flags if word.startswith("--")):
                assert f'"{flag}"' in source, f"{block.name}: {module} has no flag {flag}"


def test_every_supported_model_has_a_row_naming_its_self_attention_modules():
    from dit_sparse.pipelines.adapter import registered_adapters

    rows = {line.split("|")[1].strip(" `"): line for line in (ROOT / "docs" / "integration.md").read_text().splitlines()
            if line.startswith("| `")}
    for adapter in registered_adapters():
        name = adapter.transformer_class.__name__
        assert name in rows, f"docs/integration.md lists no {name}: add its row to the supported models"
        modules = rows[name].split("|")[3]
        for blocks, attention in adapter.self_attention:
            assert f"`{blocks}.{{i}}.{attention}`" in modules, f"{name}'s row does not name {blocks}.{{i}}.{attention}"


def test_markers_are_the_comments_right_above_a_fence(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- needs: a GPU -->\n\n```python\nx = 1\n```\n<!-- app-example -->\n<!-- continues -->\n"
                    "```python\ny = x\n```\n```\nno language\n```\n")
    first, second, third = read_blocks(page)
    assert (first.line, first.markers, first.needs, first.code) == (3, [], None, "x = 1\n")  # a blank line cuts
    assert (second.markers, second.previous, second.code) == (["app-example", "continues"], first, "y = x\n")
    assert (third.language, third.previous) == ("", second)


def _integration(namespace: dict, folder: Path, out: str) -> None:
    stats = namespace["stats"]
    assert stats.sparse_calls > 0 and 0 < stats.mean_sparse_density < 1
    assert (folder / "wan-plans.safetensors").exists()
    assert "self-attention calls sparse" in out


def _app(namespace: dict, folder: Path, out: str) -> None:
    assert namespace["again"].dense_from_cache and (folder / "mask.png").exists()
    assert namespace["result"].readings is not None and "Reading(background=" in out
    assert "dense from the cache: True" in out


def _parallel(namespace: dict, folder: Path, out: str) -> None:
    """The context-parallel example on two ranks (torchrun, gloo) prints the checksum it printed here."""
    block = next(b for b in BLOCKS if "parallel-example" in b.markers)
    (folder / "wan_parallel.py").write_text(block.code)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "wan_parallel.py"],
        cwd=folder, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    checksum = next(line for line in out.splitlines() if line.startswith("video checksum"))
    assert checksum in run.stdout.splitlines()
    assert len(namespace["stats"].rank_attention_flops) == 1
    assert re.search(r"attention FLOPs per rank: \S+, \S+$", run.stdout, re.M)


CHECKS = {"integration-example": _integration, "app-example": _app, "parallel-example": _parallel}
