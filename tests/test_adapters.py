"""Every adapter against the stock diffusers processors, on tiny pipelines of every family."""

import pytest
import torch

from dit_sparse import SparseAttentionConfig, apply_sparse_attention, remove_sparse_attention
from dit_sparse.config import PATTERNS as ALL_PATTERNS
from dit_sparse.pipelines.processor import SparseAttnProcessor
from tiny_pipelines import FAMILIES

PATTERNS = [p for p in ALL_PATTERNS if p != "dense"]
BUDGETED = [p for p in PATTERNS if p != "radial_paper"]  # radial_paper's decay, not the budget, sets its density
PEERS = ("radial_paper", "svg1", "svg2")  # their rules round up to 128-token bands: tiny videos stay near dense
OWN = [p for p in PATTERNS if p not in PEERS]

SELF_ATTENTION = {  # where each model does self-attention (DIFFUSERS.md), by block list
    "WanTransformer3DModel": [("blocks", "attn1")],
    "HunyuanVideoTransformer3DModel": [("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")],
    "CogVideoXTransformer3DModel": [("transformer_blocks", "attn1")],
    "LTXVideoTransformer3DModel": [("transformer_blocks", "attn1")],
    "FluxTransformer2DModel": [("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")],
    "SkyReelsV2Transformer3DModel": [("blocks", "attn1")],
}


def sparse(pattern: str = "adaptive", **overrides) -> SparseAttentionConfig:
    # min_recall 0: on random tiny weights no family reaches a real threshold, and auto would stay dense
    return SparseAttentionConfig(**{"pattern": pattern, "density": 0.4, "block_size": 16, "dense_steps": 1,
                                    "dense_layers": (), "min_recall": 0.0, **overrides})


def transformers(pipe):
    return [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]


def processors(pipe):
    return [(name, m.processor) for t in transformers(pipe) for name, m in t.named_modules() if hasattr(m, "processor")]


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_processors_sit_on_self_attention_only(tiny, family):
    case = tiny(family)
    apply_sparse_attention(case.pipe, sparse())
    for transformer in transformers(case.pipe):
        expected = {f"{blocks}.{i}.{attn}" for blocks, attn in SELF_ATTENTION[type(transformer).__name__]
                    for i in range(len(getattr(transformer, blocks)))}
        swapped = {name for name, m in transformer.named_modules()
                   if isinstance(getattr(m, "processor", None), SparseAttnProcessor)}
        assert swapped == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_core_is_bit_exact_and_remove_restores_the_stock_processors(tiny, family):
    case = tiny(family)
    stock_processors = processors(case.pipe)
    apply_sparse_attention(case.pipe, SparseAttentionConfig(pattern="dense"))
    assert torch.equal(case(), case.stock)
    controller = apply_sparse_attention(case.pipe, sparse(dense_steps=case.steps))
    assert torch.equal(case(), case.stock)
    assert controller.last_stats.sparse_calls == 0 and controller.last_stats.calibrations == 0
    remove_sparse_attention(case.pipe)
    assert [(n, id(p)) for n, p in processors(case.pipe)] == [(n, id(p)) for n, p in stock_processors]
    assert torch.equal(case(), case.stock)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", BUDGETED)
def test_a_plan_keeping_every_block_matches_stock(tiny, family, pattern):
    case = tiny(family)
    controller = apply_sparse_attention(case.pipe, sparse(pattern, density=1.0))
    out = case()
    stats = controller.last_stats
    assert stats.sparse_calls > 0 and stats.mean_sparse_density == pytest.approx(1.0)
    torch.testing.assert_close(out, case.stock, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", PEERS)
def test_peer_presets_plan_and_run_on_every_model(tiny, family, pattern):
    case = tiny(family)
    controller = apply_sparse_attention(case.pipe, sparse(pattern))
    out = case()
    stats = controller.last_stats
    assert stats.sparse_calls > 0 and 0 < stats.mean_sparse_density <= 1.0 and stats.calibrations > 0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", OWN)
def test_sparse_steps_run_sparse(tiny, family, pattern):
    case = tiny(family)
    controller = apply_sparse_attention(case.pipe, sparse(pattern))
    out = case()
    stats = controller.last_stats
    layers = sum(len(getattr(t, b)) for t in transformers(case.pipe) for b, _ in SELF_ATTENTION[type(t).__name__])
    assert stats.sparse_calls > 0 and stats.mean_sparse_density < 0.8
    assert 0 < stats.calibrations <= 2 * layers * 2  # per layer, per CFG context (two experts at most)
    assert all(s.sparse == 0 for s in stats.steps if s.step == 0)
    assert torch.isfinite(out).all() and not torch.allclose(out, case.stock, atol=1e-4)
