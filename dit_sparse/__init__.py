"""dit-sparse: block-sparse attention for diffusers' diffusion transformers.

Example::

    from dit_sparse import SparseAttentionConfig, apply_sparse_attention

    apply_sparse_attention(pipe, SparseAttentionConfig(pattern="auto", density=0.15))
    video = pipe(prompt="a cat surfing", num_frames=81).frames[0]
"""

from importlib import import_module
from typing import Any

from .source_checkout import move_checkout_root_last

move_checkout_root_last()

__version__ = "0.1.0"

# Every public name, by the module that defines it. Each loads on first use: ``import dit_sparse``
# (and a command-line ``--help`` under it) imports neither torch nor diffusers, and the core never
# imports the pipelines layer, which imports diffusers' models.
_SOURCES = {
    "BlockSparsePlan": ".plan",
    "SparseAttentionConfig": ".config",
    "SparseAttentionController": ".controller",
    "SparsePipeline": ".pipelines",
    "SparseRunStats": ".stats",
    "TokenLayout": ".layout",
    "apply_sparse_attention": ".pipelines",
    "remove_sparse_attention": ".pipelines",
    "sparse_attention": ".attention",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name in _SOURCES:
        return getattr(import_module(_SOURCES[name], __name__), name)
    raise AttributeError(f"module 'dit_sparse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SOURCES])
