"""dit-sparse: block-sparse attention for diffusers' diffusion transformers.

Example::

    from dit_sparse import SparseAttentionConfig, apply_sparse_attention

    apply_sparse_attention(pipe, SparseAttentionConfig(pattern="auto", density=0.15))
    video = pipe(prompt="a cat surfing", num_frames=81).frames[0]
"""

from typing import Any

from .attention import sparse_attention
from .config import SparseAttentionConfig
from .controller import SparseAttentionController
from .layout import TokenLayout
from .plan import BlockSparsePlan
from .stats import SparseRunStats

__version__ = "0.1.0"

# Names that live in dit_sparse.pipelines (which imports diffusers' models): loaded on first use, so
# the core never imports the pipelines layer at import time.
_PIPELINE_NAMES = ("SparsePipeline", "apply_sparse_attention", "remove_sparse_attention")

__all__ = [
    "BlockSparsePlan",
    "SparseAttentionConfig",
    "SparseAttentionController",
    "SparsePipeline",
    "SparseRunStats",
    "TokenLayout",
    "apply_sparse_attention",
    "remove_sparse_attention",
    "sparse_attention",
]


def __getattr__(name: str) -> Any:
    if name in _PIPELINE_NAMES:
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'dit_sparse' has no attribute {name!r}")
