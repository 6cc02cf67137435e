"""The base of every sparse self-attention processor: the part that is the same for all models."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from dit_sparse.controller import SparseAttentionController


_COMPILE_BREAK = (
    "dit-sparse runs each self-attention call (dense, calibration or sparse, decided per layer and step) outside "
    "the compiled graph; compile without fullgraph=True"
)


class SparseAttnProcessor:
    """Base class of the sparse processors.

    A model's subclass repeats its stock processor's projection, norm and RoPE math, then hands the
    query, key and value to :meth:`attend` together with ``dense``, a function that makes exactly
    the stock attention call: while a layer is dense the output is bit-exact with the stock one.

    Args:
        controller: the controller shared by the pipeline's transformers.
        transformer: the transformer's component name (``"transformer"``, ``"transformer_2"``).
        layer: the module's index among the transformer's self-attention modules.
        stock: the processor it replaces (its attention backend is kept); it comes back on
            ``remove_sparse_attention``.

    The diffusers parallel config (``_parallel_config``, set by ``enable_parallelism``) is the stock
    processor's: the dense path runs the stock (context-parallel) attention call, and the stock
    processor keeps the config when it comes back.
    """

    _attention_backend = None

    def __init__(self, controller: SparseAttentionController, transformer: str, layer: int, stock: Any) -> None:
        self.controller = controller
        self.transformer = transformer
        self.layer = layer
        self.stock = stock
        backend = getattr(stock, "_attention_backend", None)
        if backend is not None:
            self._attention_backend = backend

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.stock, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, config: Any) -> None:
        self.stock._parallel_config = config

    # One explicit graph break per self-attention call under torch.compile: whether a call runs dense,
    # calibrates or runs sparse is per-layer, per-step Python state, and the sparse path gathers by
    # plan indices and calibration reads tensor values (e.g. the longest run in radial pooling);
    # traced, each layer and step would become a graph of its own. Projections, norms, RoPE and the
    # output projection around it still compile, and repeated blocks share their graphs.
    @torch.compiler.disable(reason=_COMPILE_BREAK)
    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        dense: Callable[[], torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over ``(B, S, H, D)`` ``query``, ``key``, ``value``: ``dense()`` or sparse.

        ``attention_mask`` is a mask the token layout does not describe (HunyuanVideo's text padding
        is described by the layout and is not passed here): such a call cannot be made sparse and
        runs ``dense()``.
        """
        if attention_mask is not None:
            warnings.warn(
                f"{type(self).__name__} got an attention mask its token layout does not describe; those calls run "
                "dense",
                stacklevel=3,  # past the torch.compiler.disable wrapper
            )
            return dense()
        return self.controller.attend(self.transformer, self.layer, query, key, value, dense)

    def attend_dispatched(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_in_layout: bool = False,
    ) -> torch.Tensor:
        """:meth:`attend` with the dense path of the processors that call diffusers'
        ``dispatch_attention_fn`` (the attention backend switch); ``mask_in_layout`` says that the
        token layout already describes ``attention_mask`` (HunyuanVideo's text padding)."""

        def dense() -> torch.Tensor:
            return dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )

        return self.attend(query, key, value, dense, None if mask_in_layout else attention_mask)
