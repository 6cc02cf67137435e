import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_subpackages_under_dit_sparse(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("dit_sparse-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    sources = {"dit_sparse": ROOT / "dit_sparse", **{f"dit_sparse/{sub}": ROOT / sub
                                                     for sub in ("kernels", "pipelines", "app", "eval")}}
    for installed, folder in sources.items():
        for init in folder.rglob("__init__.py"):  # every package, subpackages included
            assert f"{installed}/{init.relative_to(folder).as_posix()}" in names, f"the wheel lacks {init.parent}"
    assert "dit_sparse/kernels/block_sparse_attention_torch.py" in names
    model = "dit_sparse/eval/reference/model/"
    for part in ("model_index.json", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert model + part in names, f"the wheel lacks the reference model's {part}"
    assert not any(n.split("/")[0] in {"kernels", "pipelines", "app", "eval", "tests"} for n in names)


def test_subpackages_import_from_the_install():
    import dit_sparse.app
    import dit_sparse.eval
    import dit_sparse.kernels
    import dit_sparse.pipelines

    assert Path(dit_sparse.kernels.__file__).parent.name == "kernels"


def test_core_imports_without_the_pipelines_layer_and_exposes_its_names_lazily():
    code = (
        "import sys, dit_sparse\n"
        "assert 'dit_sparse.pipelines' not in sys.modules and 'diffusers' not in sys.modules\n"
        "from dit_sparse import SparsePipeline, apply_sparse_attention, remove_sparse_attention\n"
        "from dit_sparse.pipelines import SparsePipeline as same\n"
        "assert SparsePipeline is same and 'dit_sparse.pipelines' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_triton_is_the_gpu_extra_and_all_still_installs_it():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(requirement.startswith("triton") for requirement in project["dependencies"])
    extras = project["optional-dependencies"]
    assert [r.split(">=")[0] for r in extras["gpu"]] == ["triton"]
    assert "gpu" in extras["all"][0].split("[")[1]


def test_moved_commands_still_run_under_their_old_names_with_a_deprecation_warning():
    from dit_sparse.eval._moved import MOVED

    result = subprocess.run([sys.executable, "-m", "dit_sparse.eval.bench_planner", "--help"],
                            capture_output=True, text=True, check=True)
    assert "usage:" in result.stdout
    assert "DeprecationWarning: dit_sparse.eval.bench_planner moved to dit_sparse.eval.bench.planner" in result.stderr
    for old, new in MOVED.items():
        with pytest.warns(DeprecationWarning, match=f"use python -m {new}"):
            sys.modules.pop(old, None)
            module = importlib.import_module(old)
        assert module is importlib.import_module(new) and callable(module.main)
