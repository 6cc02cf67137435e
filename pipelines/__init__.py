"""diffusers integration: model adapters, the hooks, ``SparsePipeline``. Installed as
``dit_sparse.pipelines``; its public names are also reachable from ``dit_sparse``.

Importing this package registers the adapter of every supported transformer class.
"""

from . import cogvideox, flux, hunyuan_video, ltx, skyreels_v2, wan  # noqa: F401  (register the adapters)
from .adapter import ModelAdapter, adapter_for, register_adapter, supported_transformers
from .hooks import apply_sparse_attention, remove_sparse_attention
from .sparse_pipeline import SparsePipeline

__all__ = [
    "ModelAdapter",
    "SparsePipeline",
    "adapter_for",
    "apply_sparse_attention",
    "register_adapter",
    "remove_sparse_attention",
    "supported_transformers",
]
