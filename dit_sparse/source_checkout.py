"""Keep a source checkout's root from hiding the Hugging Face ``kernels`` package.

``python -m ...`` and ``python -c ...`` put the working directory first on ``sys.path``. Run from a
clone of this repository, that makes its ``kernels/`` folder (installed as ``dit_sparse.kernels``)
the top-level ``kernels`` module, the name under which transformers imports the Hugging Face
package when it is installed, and every diffusers model import fails. Importing ``dit_sparse``
moves the clone's root behind the installed packages; the clone's own modules still import, since
the package is installed from it.

Example::

    import dit_sparse  # first, in a process started at the clone's root
    from diffusers import WanTransformer3DModel
"""

import os
import sys
from pathlib import Path

CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
_MARKERS = ("pyproject.toml", "kernels/block_sparse_attention_torch.py")


def is_source_checkout(root: Path = CHECKOUT_ROOT) -> bool:
    """Whether ``root`` is a clone of this repository (not the site-packages of an install)."""
    return all((root / marker).is_file() for marker in _MARKERS)


def move_checkout_root_last() -> None:
    """Move the clone's root (``''`` too, when it is the working directory) to the end of ``sys.path``."""
    if not is_source_checkout():
        return
    at_root = [entry for entry in sys.path if Path(entry or os.curdir).resolve() == CHECKOUT_ROOT]
    if not at_root:
        return
    sys.path[:] = [entry for entry in sys.path if entry not in at_root] + at_root
    shadowing = sys.modules.get("kernels")
    if shadowing is not None and str(getattr(shadowing, "__file__", "")).startswith(str(CHECKOUT_ROOT / "kernels")):
        del sys.modules["kernels"]
