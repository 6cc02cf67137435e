"""Every docstring example in the package runs and prints what it shows (examples that need a GPU
or a downloaded checkpoint are marked ``+SKIP``)."""

import doctest
import importlib
import pkgutil

import pytest

from dit_sparse.eval._moved import MOVED

PACKAGES = ["dit_sparse", "dit_sparse.kernels", "dit_sparse.families", "dit_sparse.pipelines", "dit_sparse.eval",
            "dit_sparse.eval.harness", "dit_sparse.eval.bench", "dit_sparse.eval.studies", "dit_sparse.app"]
DEPRECATED = set(MOVED)  # old names of moved commands: the same modules under their new names


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(path)
                  if m.name != "__main__" and f"{package}.{m.name}" not in DEPRECATED]
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != "triton":
            raise
        pytest.skip(f"{name} needs triton: pip install -e '.[gpu]' (CUDA builds of torch bring it)")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"
