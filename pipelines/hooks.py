"""``apply_sparse_attention`` / ``remove_sparse_attention`` and the hook they register, in the style
of diffusers' own accelerators (``apply_first_block_cache``): the configuration is
:class:`~dit_sparse.SparseAttentionConfig`, processors are swapped with ``set_processor`` on the
self-attention modules only, and one stateful hook per transformer, registered under a fixed name,
tells the shared controller about every forward call."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager

from dit_sparse.config import SparseAttentionConfig
from dit_sparse.controller import SparseAttentionController

from .adapter import ModelAdapter, adapter_for
from .call_arguments import ForwardArguments, timestep_value
from .components import denoisers, total_steps_of
from .parallel import context_parallel_config, ulysses_group
from .processor import SparseAttnProcessor

_SPARSE_ATTENTION_HOOK = "dit_sparse_attention"
_COMPILE_BREAK = "dit-sparse counts denoising steps outside the compiled graph; compile without fullgraph=True"


class SparseAttentionHook(ModelHook):
    """Tells the controller which step, CFG context and token layout each forward call of one
    transformer has, and ends the generation when the pipeline resets its stateful hooks.

    The pipeline's ``cache_context`` reaches the hook through ``state_manager`` (diffusers sets the
    context on every stateful hook's ``StateManager``). Under context parallelism it wraps diffusers'
    sharding hooks, so it reads the whole call's arguments.
    """

    _is_stateful = True

    def __init__(
        self,
        controller: SparseAttentionController,
        adapter: ModelAdapter,
        name: str,
        modules: list[tuple[str, torch.nn.Module]],
    ) -> None:
        super().__init__()
        self.controller = controller
        self.adapter = adapter
        self.name = name
        self.modules = modules
        self.parallel = None
        self.state_manager = StateManager(BaseState)
        self._arguments: ForwardArguments | None = None
        self._checked_generation = -1

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._arguments = ForwardArguments(module.forward)
        self.parallel = context_parallel_config(module)
        return module

    # Step counting reads the timestep's value and keeps Python state: run it outside a compiled graph.
    @torch.compiler.disable(reason=_COMPILE_BREAK)
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        if context_parallel_config(module) is not self.parallel:
            raise RuntimeError(
                f"{self.name} ({type(module).__name__}) got enable_parallelism after apply_sparse_attention; the "
                "stock processors kept its parallel config: call remove_sparse_attention, then apply_sparse_attention "
                "again (enable parallelism first, then apply sparse attention)"
            )
        arguments = self._arguments.bind(args, kwargs)
        context = self._cache_context()
        step_index = None if context is None else context.step_index
        timestep = None if step_index is not None else timestep_value(arguments("timestep"))
        self.controller.begin_call(
            self.name,
            None if context is None else context.name,
            self.adapter.layout(module, arguments),
            step_index=step_index,
            timestep=timestep,
            total_steps=None if context is None else context.num_inference_steps,
        )
        if self._checked_generation != self.controller.generation:
            self._check_still_installed(module)
            self._checked_generation = self.controller.generation
        return args, kwargs

    @torch.compiler.disable(reason=_COMPILE_BREAK)
    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.controller.end_call(self.name)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.controller.finish_generation()
        self.state_manager.reset()
        return module

    def _cache_context(self) -> CacheContext | None:
        try:
            return self.state_manager.context
        except ValueError:  # called outside any cache_context
            return None

    def _check_still_installed(self, module: torch.nn.Module) -> None:
        for qualified, attention in self.modules:
            processor = attention.processor
            if not (isinstance(processor, SparseAttnProcessor) and processor.controller is self.controller):
                raise RuntimeError(
                    f"{self.name}.{qualified} no longer runs the dit-sparse processor ({type(processor).__name__} "
                    "replaced it after apply_sparse_attention, e.g. through fuse_qkv_projections() or "
                    "set_attn_processor()); call remove_sparse_attention, make the change, then apply again"
                )


def apply_sparse_attention(pipe_or_transformer: Any, config: SparseAttentionConfig) -> SparseAttentionController:
    """Make the self-attention of a pipeline's transformers (or of one transformer) block-sparse.

    Every transformer of a pipeline (``transformer``, ``transformer_2``) gets sparse processors on its
    self-attention modules and one hook; they share one controller (step clock, plan cache,
    statistics). Applying again replaces the previous application; :func:`remove_sparse_attention`
    restores the stock processors.

    Under diffusers' Ulysses context parallelism (``enable_parallelism`` with ``ulysses_degree=P``,
    called before this, on every rank), each rank plans and runs its ``H/P`` heads over the whole
    sequence; ring attention is refused.

    Args:
        pipe_or_transformer: a diffusers pipeline or a supported transformer.
        config: the sparse attention configuration.

    Returns the shared :class:`~dit_sparse.controller.SparseAttentionController`
    (``last_stats``, ``save_plans``, ``load_plans``).

    Example::

        >>> from dit_sparse import SparseAttentionConfig, apply_sparse_attention
        >>> controller = apply_sparse_attention(pipe, SparseAttentionConfig(pattern="auto", density=0.15))  # doctest: +SKIP
        >>> video = pipe(prompt="a cat surfing", num_frames=81).frames[0]  # doctest: +SKIP
        >>> controller.last_stats.mean_sparse_density  # doctest: +SKIP
    """
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    transformers = denoisers(pipe_or_transformer)
    adapters = [adapter_for(transformer) for _, transformer in transformers]  # all supported before any change
    remove_sparse_attention(pipe_or_transformer)
    installs = []
    for (name, transformer), adapter in zip(transformers, adapters):
        modules = adapter.self_attention_modules(transformer)
        adapter.check_processors([(qualified, module.processor) for qualified, module in modules])
        installs.append((name, transformer, adapter, modules))
    ulysses = ulysses_group(installs)
    model = {name: adapter.describe(transformer) for name, transformer, adapter, _ in installs}
    total_steps = None if isinstance(pipe_or_transformer, torch.nn.Module) else total_steps_of(pipe_or_transformer)
    controller = SparseAttentionController(config, model=model, total_steps=total_steps, ulysses=ulysses)
    for name, transformer, adapter, modules in installs:
        for layer, (_, module) in enumerate(modules):
            module.set_processor(adapter.processor(controller, name, layer, module.processor))
        hook = SparseAttentionHook(controller, adapter, name, modules)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, _SPARSE_ATTENTION_HOOK)
    return controller


def remove_sparse_attention(pipe_or_transformer: Any) -> None:
    """Undo :func:`apply_sparse_attention`: every sparse processor gives way to the stock processor
    it replaced (bit-exact output again) and the hooks are removed. Sparse processors that diffusers
    put back on its own (``unfuse_qkv_projections()`` restores the processors it saw when fusing)
    are unwrapped too. Does nothing where dit-sparse is not applied.

    Example::

        >>> remove_sparse_attention(pipe)  # doctest: +SKIP
    """
    for _, transformer in denoisers(pipe_or_transformer):
        for module in transformer.modules():
            processor = getattr(module, "processor", None)
            if isinstance(processor, SparseAttnProcessor):
                module.set_processor(processor.stock)
        registry = getattr(transformer, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(_SPARSE_ATTENTION_HOOK) is not None:
            registry.remove_hook(_SPARSE_ATTENTION_HOOK, recurse=False)
