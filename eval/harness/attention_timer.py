"""Time spent in a pipeline's attention modules, measured from outside whatever processor runs.

Forward pre- and post-hooks on every diffusers attention module of the denoiser(s) bracket the whole
module call: the q/k/v projections, norms, RoPE, the attention op (dense or sparse) and the output
projection. Which module is which comes from the transformer's
:class:`~dit_sparse.pipelines.ModelAdapter`: its self-attention layers (the modules dit-sparse makes
sparse, numbered as the plans number them), its cross-attention modules, and any other attention
module (HunyuanVideo's text refiner) are summed separately. On CUDA the brackets are CUDA events
read once at the end, so timing adds no synchronisation inside the run; elsewhere they are
``time.perf_counter`` readings.

The hooks also record each self-attention layer's dense cost, ``4 * B * S^2 * inner_dim`` FLOPs per
call (``S`` the self-attention sequence: the ``(B, S, C)`` hidden states, plus the text tokens
passed alongside them where the adapter says the text joins the sequence).

Example::

    >>> timer = AttentionTimer(pipe)                          # doctest: +SKIP
    >>> with timer:                                           # doctest: +SKIP
    ...     pipe(prompt="a fox", num_inference_steps=4)
    >>> timer.seconds()                                       # doctest: +SKIP
    {'self': 1.93, 'cross': 0.04, 'other': 0.0}
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from dit_sparse.pipelines.adapter import TEXT_IN_CROSS_ATTENTION, adapter_for
from dit_sparse.pipelines.components import denoisers

SELF, CROSS, OTHER = "self", "cross", "other"


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every diffusers attention module inside ``model``, by qualified name, in model order."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in model.named_modules() if isinstance(m, (AttentionModuleMixin, Attention))}


@dataclass(frozen=True)
class _Timed:
    module: torch.nn.Module
    kind: str
    layer: tuple[str, int] | None = None  # (transformer, layer) of a self-attention layer
    joint_text: bool = False  # text passed alongside the hidden states joins the self-attention sequence


class AttentionTimer:
    """Hooks that time every attention module of ``pipe``'s denoisers while active (``with``).

    ``pipe`` is a pipeline or a transformer built on a supported model (a ``ValueError`` names the
    supported ones otherwise)."""

    def __init__(self, pipe: Any) -> None:
        self._timed: dict[str, _Timed] = {}
        for component, model in denoisers(pipe):
            adapter = adapter_for(model)
            joint_text = adapter.text != TEXT_IN_CROSS_ATTENTION
            timed = {name: _Timed(module, OTHER) for name, module in attention_modules(model).items()}
            timed |= {name: _Timed(module, CROSS) for name, module in adapter.cross_attention_modules(model)}
            timed |= {name: _Timed(module, SELF, (component, layer), joint_text)
                      for layer, (name, module) in enumerate(adapter.self_attention_modules(model))}
            self._timed.update({f"{component}.{name}": entry for name, entry in timed.items()})
        self._handles: list[Any] = []
        self._open: dict[str, Any] = {}
        self._spans: dict[str, list[tuple[Any, Any]]] = {SELF: [], CROSS: [], OTHER: []}
        self.calls: dict[str, int] = {}
        self.dense_flops_per_call: dict[str, int] = {}

    @property
    def self_attention_layers(self) -> dict[str, tuple[str, int]]:
        """Each self-attention module's ``(transformer, layer)``, by qualified name: the layers of
        the transformer's :class:`~dit_sparse.pipelines.ModelAdapter`."""
        return {name: entry.layer for name, entry in self._timed.items() if entry.kind == SELF}

    def layer_names(self) -> dict[tuple[str, int], str]:
        """Each self-attention layer's qualified module name, by ``(transformer, layer)``."""
        return {layer: name for name, layer in self.self_attention_layers.items()}

    def kinds(self) -> dict[str, str]:
        """Each timed module's kind (``"self"``, ``"cross"`` or ``"other"``), by qualified name."""
        return {name: entry.kind for name, entry in self._timed.items()}

    def self_attention_flops(self) -> dict[tuple[str, int], int]:
        """Dense FLOPs of one call of each self-attention layer seen so far, by ``(transformer, layer)``."""
        return {self._timed[name].layer: flops for name, flops in self.dense_flops_per_call.items()}

    def __enter__(self) -> AttentionTimer:
        self.reset()
        for name, entry in self._timed.items():
            self._handles.append(entry.module.register_forward_pre_hook(self._pre_hook(name, entry), with_kwargs=True))
            self._handles.append(entry.module.register_forward_hook(self._post_hook(name, entry.kind)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self._open.clear()
        for spans in self._spans.values():
            spans.clear()
        self.calls.clear()

    def seconds(self) -> dict[str, float]:
        """Seconds spent in self-attention, cross-attention and other attention modules since the
        last reset."""
        return {kind: sum(_elapsed(start, end) for start, end in spans) for kind, spans in self._spans.items()}

    def _pre_hook(self, name: str, entry: _Timed):
        def hook(module, args, kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if entry.kind == SELF:
                self.dense_flops_per_call[name] = _dense_flops(module, args, kwargs, entry.joint_text)
            device = _hidden_states(args, kwargs).device
            self._open[name] = (device, _mark(device))

        return hook

    def _post_hook(self, name: str, kind: str):
        def hook(module, args, output):
            device, start = self._open.pop(name)
            self._spans[kind].append((start, _mark(device)))

        return hook


def _mark(device: torch.device) -> float | torch.cuda.Event:
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def _elapsed(start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _dense_flops(module: torch.nn.Module, args: tuple, kwargs: dict, joint_text: bool) -> int:
    hidden = _hidden_states(args, kwargs)
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    batch, seq = hidden.shape[0], hidden.shape[1]
    if joint_text and isinstance(text, torch.Tensor):
        seq += text.shape[1]
    inner = module.to_q.out_features if hasattr(module, "to_q") else hidden.shape[-1]
    return 4 * batch * seq * seq * inner
