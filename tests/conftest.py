import os

import pytest
import torch

import dit_sparse  # noqa: F401  (before diffusers: keeps the clone's kernels/ from hiding Hugging Face's)

# Without CUDA the Triton kernels run in Triton's CPU interpreter, which is chosen when a kernel is
# defined: switch it on before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TinyCases:
    """Tiny pipelines by family, each built once per session with its stock output (``case.stock``)."""

    def __init__(self) -> None:
        self._cases = {}

    def __call__(self, family: str):
        if family not in self._cases:
            from tiny_pipelines import build

            case = build(family)
            case.stock = case()
            self._cases[family] = case
        return self._cases[family]

    def restore(self) -> None:
        """Leave every built pipeline stock again (tests may wrap them)."""
        if self._cases:
            from dit_sparse import remove_sparse_attention

            for case in self._cases.values():
                remove_sparse_attention(case.pipe)


_TINY = TinyCases()


@pytest.fixture
def one_thread():
    """Run the test on one thread: tiny models are so small that thread hand-offs cost more than
    the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(one_thread):
    """``tiny(family)`` -> a :class:`tiny_pipelines.TinyCase`, stock again after the test."""
    yield _TINY
    _TINY.restore()
