"""Each model's self-attention layers, as its adapter names and numbers them, are the layers every
part of dit-sparse uses: the sparse processors and their plans, the eval's attention timer (its
layers, its self-/cross-attention split and its per-layer FLOPs) and the demo's mask pictures."""

import pytest
import torch

from dit_sparse import SparseAttentionConfig, apply_sparse_attention
from dit_sparse.eval.harness.attention_timer import CROSS, OTHER, SELF, AttentionTimer, attention_modules
from dit_sparse.pipelines import adapter_for
from dit_sparse.pipelines.call_arguments import ForwardArguments
from dit_sparse.pipelines.components import denoisers
from dit_sparse.pipelines.processor import SparseAttnProcessor
from tiny_pipelines import FAMILIES

CONFIG = SparseAttentionConfig(pattern="adaptive", density=0.4, block_size=16, dense_steps=1, dense_layers=(),
                               min_recall=0.0)
DELAY_S = 0.02


def sparse_processor_layers(pipe) -> dict[str, tuple[str, int]]:
    """``(transformer, layer)`` of every module that runs a sparse processor, by qualified name."""
    return {f"{component}.{name}": (component, module.processor.layer)
            for component, transformer in denoisers(pipe) for name, module in transformer.named_modules()
            if isinstance(getattr(module, "processor", None), SparseAttnProcessor)}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_timer_the_processors_and_the_plans_number_the_same_layers(tiny, family):
    case = tiny(family)
    controller = apply_sparse_attention(case.pipe, CONFIG)
    timer = AttentionTimer(case.pipe)
    assert timer.self_attention_layers == sparse_processor_layers(case.pipe)
    for component, transformer in denoisers(case.pipe):
        names = adapter_for(transformer).self_attention_layers(transformer)
        assert [timer.layer_names()[(component, layer)] for layer in range(len(names))] == [
            f"{component}.{name}" for name in names]

    sequences = {}  # the transformer's last call: batch and self-attention sequence, from its token layout
    hooks = [transformer.register_forward_pre_hook(_layout_recorder(component, transformer, sequences),
                                                   with_kwargs=True)
             for component, transformer in denoisers(case.pipe)]
    try:
        with timer:
            case()
    finally:
        for hook in hooks:
            hook.remove()
    planned = {(key.transformer, key.layer) for key, _ in controller.plans.items()}
    assert planned and planned <= set(timer.self_attention_flops())
    modules = {f"{component}.{name}": module for component, transformer in denoisers(case.pipe)
               for name, module in attention_modules(transformer).items()}
    for name, (component, layer) in timer.self_attention_layers.items():
        batch, sequence = sequences[component]
        inner = modules[name].to_q.out_features
        assert timer.self_attention_flops()[(component, layer)] == 4 * batch * sequence**2 * inner, name


def _layout_recorder(component, transformer, sequences):
    arguments = ForwardArguments(transformer.forward)
    adapter = adapter_for(transformer)

    def hook(module, args, kwargs):
        read = arguments.bind(args, kwargs)
        sequences[component] = (read("hidden_states").shape[0], adapter.layout(module, read).seq_len)

    return hook


@pytest.mark.parametrize(("family", "kinds"), [
    ("ltx", {"transformer_blocks.0.attn1": SELF, "transformer_blocks.0.attn2": CROSS,
             "transformer_blocks.1.attn1": SELF, "transformer_blocks.1.attn2": CROSS}),
    ("hunyuan_video", {"context_embedder.token_refiner.refiner_blocks.0.attn": OTHER,
                       "transformer_blocks.0.attn": SELF, "single_transformer_blocks.0.attn": SELF}),
    ("wan", {"blocks.0.attn1": SELF, "blocks.0.attn2": CROSS, "blocks.1.attn1": SELF, "blocks.1.attn2": CROSS}),
    ("skyreels_v2", {"blocks.0.attn1": SELF, "blocks.0.attn2": CROSS, "blocks.1.attn1": SELF,
                     "blocks.1.attn2": CROSS}),
])
def test_attention_that_is_not_a_sparse_layer_is_not_timed_as_self_attention(tiny, family, kinds):
    case = tiny(family)
    timer = AttentionTimer(case.pipe)
    assert timer.kinds() == {f"transformer.{name}": kind for name, kind in kinds.items()}
    slow = {name: module for name, module in attention_modules(case.pipe.transformer).items() if kinds[name] != SELF}
    with timer:  # hooks registered after the timer's run inside its brackets
        hooks = [module.register_forward_pre_hook(lambda *_: _sleep()) for module in slow.values()]
        try:
            case()
        finally:
            for hook in hooks:
                hook.remove()
    slept = DELAY_S * sum(timer.calls[f"transformer.{name}"] for name in slow)
    seconds = timer.seconds()
    assert seconds[CROSS] + seconds[OTHER] >= slept
    assert seconds[SELF] < slept  # before, LTX's attn2 and HunyuanVideo's refiner counted as self-attention


def _sleep():
    import time

    time.sleep(DELAY_S)


def test_each_adapter_says_where_its_text_is_as_its_token_layouts_do(tiny):
    for family in FAMILIES:
        case = tiny(family)
        for _, transformer in denoisers(case.pipe):
            adapter = adapter_for(transformer)
            layouts = []
            arguments = ForwardArguments(transformer.forward)
            hook = transformer.register_forward_pre_hook(
                lambda module, args, kwargs: layouts.append(adapter.layout(module, arguments.bind(args, kwargs))),
                with_kwargs=True)
            try:
                case(num_inference_steps=1)
            finally:
                hook.remove()
            if not layouts:  # Wan 2.2's second expert does not run in a one-step generation
                continue
            placement = {(False, False): "cross-attention", (True, True): "first", (True, False): "last"}
            assert {placement[(layout.text_len > 0, layout.text_first)] for layout in layouts} == {adapter.text}


def test_a_mask_layer_the_model_lacks_is_refused_naming_its_layers_before_generating():
    from dit_sparse.eval.harness.models import EvalModel, GenerationSettings
    from dit_sparse.eval.harness.offline_model import OfflineWanSpec, build_offline_pipeline
    from dit_sparse.eval.harness.runner import run_evaluation

    spec = OfflineWanSpec(num_layers=2)
    model = EvalModel(build_offline_pipeline(spec), "tiny offline Wan", random_weights=True, offline_spec=spec)
    with pytest.raises(ValueError, match=r"--mask-layer 2 does not exist: the model has self-attention layers 0\.\.1 "
                                         r"\(transformer\.blocks\.0\.attn1 \.\. transformer\.blocks\.1\.attn1\)"):
        run_evaluation(model, [CONFIG], ["a red fox"], GenerationSettings(steps=2), mask_layer=2)
