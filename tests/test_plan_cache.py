import json

import pytest
import torch
from safetensors.torch import save_file

from dit_sparse import BlockSparsePlan, SparseAttentionConfig, TokenLayout
from dit_sparse.plan_cache import PlanCache, PlanKey
from random_plans import random_plan, random_starts

MODEL = {"transformer": {"class": "WanTransformer3DModel", "self_attention_layers": 2, "heads": 2}}
CONFIG = SparseAttentionConfig(pattern="adaptive", density=0.3).plan_signature()


def static_plan(layout: TokenLayout) -> BlockSparsePlan:
    """A plan built the way a static family builds one: the same tile order for q and kv."""
    order = layout.tile_order((1, 2, 4))
    n = layout.num_blocks(16)
    i = torch.arange(n)
    band = ((i[:, None] - i[None, :]).abs() <= 1).expand(2, n, n)
    return BlockSparsePlan.from_block_mask(band, layout, 16, q_order=order, kv_order=order)


def test_identical_plans_are_shared_not_copied():
    layout = TokenLayout((2, 4, 8), text_len=5)
    cache = PlanCache()
    first = cache.put(PlanKey("transformer", 0, "cond", layout.geometry), static_plan(layout), None, 1, 3)
    second = cache.put(PlanKey("transformer", 1, "cond", layout.geometry), static_plan(layout), None, 1, 3)
    other_plan = random_plan(layout, 2, 16, seed=4)
    other = cache.put(PlanKey("transformer", 2, "cond", layout.geometry), other_plan, None, 1, 3)
    assert second.plan is first.plan and other.plan is not first.plan
    assert len(cache) == 3 and cache.unique_plans() == 2


def test_plan_for_adapts_text_padding_and_keeps_the_result():
    layout = TokenLayout((2, 4, 8), text_len=5)
    entry = PlanCache().put(PlanKey("t", 0, "cond", layout.geometry), static_plan(layout), None, 1, 3)
    padded = layout.with_valid_text_len((3,))
    ready = entry.plan_for(padded)
    assert ready.layout == padded and entry.plan_for(padded) is ready
    assert entry.plan_for(layout).layout == layout


def test_save_and_load_round_trip(tmp_path):
    small, large = TokenLayout((2, 4, 8), text_len=5, text_first=True), TokenLayout((3, 4, 8))
    cache = PlanCache()
    plans = {
        PlanKey("transformer", 0, "cond", small.geometry): static_plan(small),
        PlanKey("transformer", 1, "cond", small.geometry): static_plan(small),
        PlanKey("transformer", 0, "uncond", large.geometry): random_plan(large, 2, 16, batch=2, seed=2),
        PlanKey("transformer_2", 1, "cond", large.geometry): random_plan(large, 2, (32, 16), orders=False, seed=5),
    }
    for key, plan in plans.items():
        cache.put(key, plan, None, generation=1, step=2)
    path = tmp_path / "plans.safetensors"
    cache.save(path, MODEL, CONFIG)

    loaded = PlanCache()
    assert loaded.load(path, MODEL, CONFIG) == 4
    assert loaded.unique_plans() == 3
    for key, plan in plans.items():
        entry = loaded.get(key)
        assert entry.loaded and entry.plan.layout.geometry == key.geometry
        assert (entry.plan.block_size_q, entry.plan.block_size_k) == (plan.block_size_q, plan.block_size_k)
        assert torch.equal(entry.plan.to_block_mask(), plan.to_block_mask())
        for which in ("q", "kv"):
            assert torch.equal(entry.plan.order(which), plan.order(which))
    assert loaded.geometries(loaded_only=True) == {small.geometry, large.geometry}


def test_plans_with_variable_blocks_round_trip(tmp_path):
    layout = TokenLayout((2, 4, 8), text_len=5)
    g = torch.Generator().manual_seed(0)
    q_starts, kv_starts = random_starts(layout, 16, 2, 1, g), random_starts(layout, 32, 2, 1, g)
    mask = torch.rand(1, 2, q_starts.shape[-1] - 1, kv_starts.shape[-1] - 1, generator=g) < 0.4
    plan = BlockSparsePlan.from_block_mask(mask, layout, (16, 32), q_starts=q_starts, kv_starts=kv_starts)
    cache = PlanCache()
    key = PlanKey("transformer", 0, "cond", layout.geometry)
    cache.put(key, plan, None, generation=1, step=2)
    cache.put(PlanKey("transformer", 1, "cond", layout.geometry), static_plan(layout), None, generation=1, step=2)
    cache.save(tmp_path / "plans.safetensors", MODEL, CONFIG)
    loaded = PlanCache()
    loaded.load(tmp_path / "plans.safetensors", MODEL, CONFIG)
    entry = loaded.get(key).plan
    assert torch.equal(entry.q_starts, plan.q_starts) and torch.equal(entry.kv_starts, plan.kv_starts)
    assert torch.equal(entry.to_token_mask(), plan.to_token_mask())
    assert loaded.get(PlanKey("transformer", 1, "cond", layout.geometry)).plan.q_starts is None


def test_a_file_of_format_version_1_still_loads(tmp_path):
    """A file written as version 1 wrote it (no block boundaries, tensors named by role)."""
    layout = TokenLayout((2, 4, 8), text_len=5)
    plan = static_plan(layout)
    header = {
        "format": "dit-sparse-plans", "version": 1, "model": MODEL, "config": CONFIG,
        "plans": [{"block_size": [16, 16], "tensors": {"kv_counts": "t0", "kv_indices": "t1", "q_order": "t2", "kv_order": "t2"}}],
        "entries": [{"transformer": "transformer", "layer": 0, "context": "cond",
                     "layout": {"grid": [2, 4, 8], "text_len": 5, "text_first": False}, "plan": 0}],
    }
    tensors = {"t0": plan.kv_counts, "t1": plan.kv_indices, "t2": plan.q_order}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={"dit_sparse": json.dumps(header)})
    cache = PlanCache()
    assert cache.load(tmp_path / "v1.safetensors", MODEL, CONFIG) == 1
    loaded = cache.get(PlanKey("transformer", 0, "cond", layout.geometry)).plan
    assert not loaded.variable_blocks and torch.equal(loaded.to_token_mask(), plan.to_token_mask())

    header["version"] = 99
    save_file(tensors, str(tmp_path / "v99.safetensors"), metadata={"dit_sparse": json.dumps(header)})
    with pytest.raises(ValueError, match="format version 99.*reads versions 1 to"):
        PlanCache().load(tmp_path / "v99.safetensors", MODEL, CONFIG)


def test_a_file_for_another_model_or_config_is_refused(tmp_path):
    layout = TokenLayout((2, 4, 8))
    cache = PlanCache()
    cache.put(PlanKey("transformer", 0, "cond", layout.geometry), static_plan(layout), None, 1, 2)
    path = tmp_path / "plans.safetensors"
    cache.save(path, MODEL, CONFIG)
    other_model = {"transformer": {"class": "FluxTransformer2DModel", "self_attention_layers": 2, "heads": 2}}
    with pytest.raises(ValueError, match="another model.*FluxTransformer2DModel"):
        PlanCache().load(path, other_model, CONFIG)
    other_config = SparseAttentionConfig(pattern="adaptive", density=0.5).plan_signature()
    with pytest.raises(ValueError, match=r"another config \(density: file 0.3, here 0.5\)"):
        PlanCache().load(path, MODEL, other_config)
    time_only = SparseAttentionConfig(pattern="adaptive", density=0.3, dense_steps=7, backend="torch")
    assert PlanCache().load(path, MODEL, time_only.plan_signature()) == 1


def test_not_a_plan_file_and_nothing_to_save(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"note": json.dumps({})})
    with pytest.raises(ValueError, match="not a dit-sparse plan file"):
        PlanCache().load(path, MODEL, CONFIG)
    with pytest.raises(ValueError, match="no plans to save"):
        PlanCache().save(tmp_path / "empty.safetensors", MODEL, CONFIG)
