"""The installed diffusers against what the adapters reproduce: a diffusers upgrade that changes a
stock self-attention processor fails here, naming the processor, instead of silently changing
dit-sparse's output (docs/integration.md, "The diffusers pin")."""

import inspect
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from dit_sparse import SparseAttentionConfig, apply_sparse_attention
from dit_sparse.pipelines import adapter_for
from dit_sparse.pipelines.adapter import registered_adapters
from dit_sparse.pipelines.components import denoisers
from tiny_pipelines import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
MOVE_THE_PIN = "see docs/integration.md, 'The diffusers pin'"


def test_the_installed_diffusers_is_the_tested_one():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(Requirement(r) for r in dependencies if r.startswith("diffusers"))
    assert {spec.operator for spec in pin.specifier} == {">=", "<"}, f"{pin} needs a lower and an upper bound"
    assert pin.specifier.contains(version("diffusers")), (
        f"diffusers {version('diffusers')} is installed, but dit-sparse is tested against {pin}; {MOVE_THE_PIN}")


@pytest.mark.parametrize("adapter", registered_adapters(), ids=lambda adapter: adapter.transformer_class.__name__)
def test_each_sparse_processor_takes_the_stock_processors_arguments(adapter):
    # attention modules pass a processor only the keyword arguments its signature names
    sparse = list(inspect.signature(adapter.processor.__call__).parameters)
    for stock in adapter.stock_processors:
        expected = list(inspect.signature(stock.__call__).parameters)
        assert sparse == expected, (
            f"diffusers {version('diffusers')}'s {stock.__name__} takes {expected}, {adapter.processor.__name__} "
            f"takes {sparse}; {MOVE_THE_PIN}")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_self_attention_module_gives_the_stock_output_on_the_dense_path(tiny, family):
    case = tiny(family)
    calls = {}  # module -> its first call's (args, kwargs, stock output)
    modules = {f"{component}.{name}": module for component, transformer in denoisers(case.pipe)
               for name, module in adapter_for(transformer).self_attention_modules(transformer)}
    hooks = [module.register_forward_hook(_recorder(calls, name), with_kwargs=True) for name, module in modules.items()]
    try:
        case()
    finally:
        for hook in hooks:
            hook.remove()
    assert calls
    apply_sparse_attention(case.pipe, SparseAttentionConfig(pattern="dense"))
    for name, (args, kwargs, expected) in calls.items():
        module = modules[name]
        with torch.no_grad():
            actual = module(*args, **kwargs)
        assert all(torch.equal(a, e) for a, e in zip(_tensors(actual), _tensors(expected), strict=True)), (
            f"{family}: {name} under diffusers {version('diffusers')}: {type(module.processor).__name__} (the dense "
            f"path) no longer reproduces the stock {type(module.processor.stock).__name__}; its projections, norms or "
            f"RoPE changed: update pipelines/ to the installed processor, {MOVE_THE_PIN}")


def _recorder(calls, name):
    def hook(module, args, kwargs, output):
        if name not in calls:
            calls[name] = (_clone(args), _clone(kwargs), _clone(output))

    return hook


def _tensors(output):
    return [t for t in (output if isinstance(output, tuple) else (output,)) if t is not None]


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value
