"""dit-sparse: block-sparse attention for diffusers' diffusion transformers.

Example::

    from dit_sparse import SparseAttentionConfig, apply_sparse_attention

    apply_sparse_attention(pipe, SparseAttentionConfig(pattern="auto", density=0.15))
    video = pipe(prompt="a cat surfing", num_frames=81).frames[0]
"""

from .attention import sparse_attention
from .config import SparseAttentionConfig
from .layout import TokenLayout
from .plan import BlockSparsePlan

__version__ = "0.1.0"

__all__ = [
    "BlockSparsePlan",
    "SparseAttentionConfig",
    "TokenLayout",
    "sparse_attention",
]
