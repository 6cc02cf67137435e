import os

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's CPU interpreter, which is chosen when a kernel is
# defined: switch it on before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
