"""Time spent in a pipeline's attention modules, measured from outside whatever processor runs.

Forward pre- and post-hooks on every diffusers attention module of the denoiser(s) bracket the whole
module call: the q/k/v projections, norms, RoPE, the attention op (dense or sparse) and the output
projection. Self- and cross-attention (modules whose ``is_cross_attention`` is set) are summed
separately. On CUDA the brackets are CUDA events read once at the end, so timing adds no
synchronisation inside the run; elsewhere they are ``time.perf_counter`` readings.

The hooks also record each self-attention module's dense cost, ``4 * B * S^2 * inner_dim`` FLOPs per
call (``S`` the joint sequence of the ``(B, S, C)`` hidden states plus any text tokens passed
alongside them).

Example::

    >>> timer = AttentionTimer(pipe)                          # doctest: +SKIP
    >>> with timer:                                           # doctest: +SKIP
    ...     pipe(prompt="a fox", num_inference_steps=4)
    >>> timer.seconds()                                       # doctest: +SKIP
    {'self': 1.93, 'cross': 0.04}
"""

from __future__ import annotations

import time
from typing import Any

import torch

SELF, CROSS = "self", "cross"


def denoisers(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's diffusion transformer(s) by component name (``transformer``, ``transformer_2``)."""
    return {name: module for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module) and name.startswith("transformer")}


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every diffusers attention module inside ``model``, by qualified name, in model order."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in model.named_modules() if isinstance(m, (AttentionModuleMixin, Attention))}


def is_cross_attention(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False))


class AttentionTimer:
    """Hooks that time every attention module of ``pipe``'s denoisers while active (``with``)."""

    def __init__(self, pipe: Any) -> None:
        self._modules: dict[str, torch.nn.Module] = {}
        self._layers: dict[str, tuple[str, int]] = {}
        for component, model in denoisers(pipe).items():
            modules = attention_modules(model)
            self_attention = [name for name, module in modules.items() if not is_cross_attention(module)]
            self._layers.update({f"{component}.{name}": (component, layer)
                                 for layer, name in enumerate(self_attention)})
            self._modules.update({f"{component}.{name}": module for name, module in modules.items()})
        if not self._modules:
            raise ValueError(f"found no diffusers attention modules in {type(pipe).__name__}; cannot time attention")
        self._handles: list[Any] = []
        self._open: dict[str, Any] = {}
        self._spans: dict[str, list[tuple[Any, Any]]] = {SELF: [], CROSS: []}
        self.calls: dict[str, int] = {}
        self.dense_flops_per_call: dict[str, int] = {}

    @property
    def self_attention_layers(self) -> dict[str, tuple[str, int]]:
        """Each self-attention module's ``(transformer, layer)``: layer ``i`` is the transformer's
        ``i``-th self-attention module in model order."""
        return dict(self._layers)

    def self_attention_flops(self) -> dict[tuple[str, int], int]:
        """Dense FLOPs of one call of each self-attention layer seen so far, by ``(transformer, layer)``."""
        return {self._layers[name]: flops for name, flops in self.dense_flops_per_call.items()}

    def __enter__(self) -> AttentionTimer:
        self.reset()
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook(name, is_cross_attention(module))))
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
        """Seconds spent in self- and cross-attention modules since the last reset."""
        return {kind: sum(_elapsed(start, end) for start, end in spans) for kind, spans in self._spans.items()}

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if not is_cross_attention(module):
                self.dense_flops_per_call[name] = _dense_flops(module, args, kwargs)
            device = _hidden_states(args, kwargs).device
            self._open[name] = (device, _mark(device))

        return hook

    def _post_hook(self, name: str, cross: bool):
        def hook(module, args, output):
            device, start = self._open.pop(name)
            self._spans[CROSS if cross else SELF].append((start, _mark(device)))

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


def _dense_flops(module: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    hidden = _hidden_states(args, kwargs)
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    batch, seq = hidden.shape[0], hidden.shape[1]
    if isinstance(text, torch.Tensor):
        seq += text.shape[1]
    inner = module.to_q.out_features if hasattr(module, "to_q") else hidden.shape[-1]
    return 4 * batch * seq * seq * inner
