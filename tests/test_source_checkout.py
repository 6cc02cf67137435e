"""Run from the clone's root, the package keeps its ``kernels/`` folder from hiding Hugging Face's."""

import importlib.metadata
import subprocess
import sys

import pytest

from dit_sparse.source_checkout import CHECKOUT_ROOT, is_source_checkout

pytestmark = pytest.mark.skipif(not is_source_checkout(), reason="needs a clone of the repository, not an install")


def run_at_checkout_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT_ROOT, capture_output=True, text=True, timeout=300)


def test_an_install_directory_is_not_taken_for_the_clone(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    assert not is_source_checkout(tmp_path)


def test_the_clone_root_moves_behind_the_installed_packages():
    result = run_at_checkout_root(
        "import sys; first = sys.path.index(''); import dit_sparse; print(first, sys.path.index(''), len(sys.path))"
    )
    assert result.returncode == 0, result.stderr
    before, after, length = map(int, result.stdout.split())
    assert before == 0 and after == length - 1


@pytest.mark.skipif(
    not any(dist.metadata["Name"] == "kernels" for dist in importlib.metadata.distributions()),
    reason="the Hugging Face kernels package is not installed, so nothing can be hidden",
)
def test_diffusers_models_import_at_the_clone_root():
    result = run_at_checkout_root(
        "import dit_sparse, kernels; from diffusers import WanTransformer3DModel; print(kernels.__file__)"
    )
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip().startswith(str(CHECKOUT_ROOT / "kernels"))
