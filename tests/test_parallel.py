"""Sparse attention under diffusers' Ulysses context parallelism, against one process: two spawned
gloo ranks on the CPU (one process group for the whole module) run the cases of parallel_cases.py,
and this process runs them alone."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from dit_sparse import SparsePipeline, apply_sparse_attention
from dit_sparse.config import PATTERNS
from dit_sparse.plan_cache import PlanCache
from dit_sparse.ulysses import balanced_head_order
from parallel_cases import (
    PLANNED, RANKS, config, plan_file, record_parallel_config, run, run_cases, wan_inputs, wan_pipe, worker,
)

TOLERANCE = 1e-5  # fp32 outputs of two ranks against one process


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(one process, two ranks, folder)``: the cases' results, and the folder with their plan files."""
    folder = tmp_path_factory.mktemp("parallel")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run_cases(folder, None)
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(port, folder), nprocs=RANKS, start_method="spawn")
    return alone, torch.load(folder / "parallel.pt", weights_only=False), folder


def assert_close(parallel: torch.Tensor, alone: torch.Tensor) -> None:
    assert (parallel - alone).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("pattern", PATTERNS)
def test_two_ranks_generate_what_one_process_does(runs, pattern):
    alone, parallel, _ = runs
    if pattern == "dense":
        assert torch.equal(parallel[pattern], parallel["stock"])
    else:
        assert not torch.equal(alone[pattern], alone["stock"])
    assert_close(parallel[pattern], alone[pattern])


@pytest.mark.parametrize("pattern", PLANNED)
def test_two_ranks_report_every_head_as_one_process(runs, pattern):
    alone, parallel = runs[0][f"{pattern} stats"], runs[1][f"{pattern} stats"]
    assert alone["sparse_calls"] == parallel["sparse_calls"] > 0
    for one, two in zip(alone["plans"], parallel["plans"], strict=True):
        assert len(two["family"][0]) == 4
        assert (two["transformer"], two["layer"], two["context"], two["family"]) == (
            one["transformer"], one["layer"], one["context"], one["family"])
        torch.testing.assert_close(torch.tensor(two["density"]), torch.tensor(one["density"]))
    assert parallel["mean_sparse_density"] == pytest.approx(alone["mean_sparse_density"])
    per_rank = parallel["rank_attention_flops"]
    assert len(per_rank) == RANKS and len(alone["rank_attention_flops"]) == 1
    assert sum(per_rank) == pytest.approx(alone["rank_attention_flops"][0])


@pytest.mark.parametrize("pattern", PLANNED)
def test_plan_files_of_two_ranks_hold_every_head_as_one_process(runs, pattern):
    _, _, folder = runs
    caches = [_load(plan_file(folder, pattern, ranks)) for ranks in (1, RANKS)]
    assert caches[0].keys() == caches[1].keys()
    for key, one in caches[0].items():
        two = caches[1][key].plan
        assert two.num_heads == one.plan.num_heads == 4
        assert torch.equal(two.to_block_mask(), one.plan.to_block_mask())
        for which in ("q", "kv"):
            assert torch.equal(two.order(which, 1), one.plan.order(which, 1))


def test_balanced_heads_give_the_same_output_and_plans_and_even_the_ranks(runs):
    alone, parallel, folder = runs
    assert_close(parallel["auto balanced"], alone["auto"])
    natural, balanced = (parallel[f"{name} stats"]["rank_attention_flops"] for name in ("auto", "auto balanced"))
    assert sum(balanced) == pytest.approx(sum(natural)) and max(balanced) <= max(natural) * (1 + 1e-9)
    caches = [_load(plan_file(folder, name, RANKS)) for name in ("auto", "auto balanced")]
    for key, entry in caches[0].items():
        assert torch.equal(caches[1][key].plan.to_block_mask(), entry.plan.to_block_mask())


@pytest.mark.parametrize("name", ["checked", "replanned balanced"])
def test_per_step_plan_checks_of_two_ranks_are_those_of_one_process(runs, name):
    """``recalibrate_error``: inf (checks recorded, no re-plan), 0 (re-plans every sparse step)."""
    alone, parallel, _ = runs
    assert_close(parallel[f"auto {name}"], alone[f"auto {name}"])
    one, two = (r[f"auto {name} stats"] for r in (alone, parallel))
    assert len(one["checks"]) > 0 and len(one["plans"]) == len(two["plans"])
    for a, b in zip(one["checks"], two["checks"], strict=True):
        assert (a["layer"], a["context"], a["step"], a["plan_step"], a["recalibrated"]) == (
            b["layer"], b["context"], b["step"], b["plan_step"], b["recalibrated"])
        torch.testing.assert_close(torch.tensor(b["error"]), torch.tensor(a["error"]), atol=1e-4, rtol=1e-4)
    assert all(c["recalibrated"] for c in one["checks"]) == (name == "replanned balanced")
    if name == "checked":
        assert_close(alone["auto checked"], alone["auto"])     # checking alone changes nothing


def test_balanced_head_order_evens_the_load_of_dense_heads():
    cost = torch.tensor([1.0, 1.0, 1.0, 0.1, 0.1, 0.1])   # the dense heads all in the first rank's natural slice
    order = balanced_head_order(cost, 2)
    assert sorted(order.tolist()) == list(range(6))
    loads = cost[order].view(2, 3).sum(1)
    assert loads.max() < cost.view(2, 3).sum(1).max() and loads.max() - loads.min() <= 1.0 + 1e-6


def test_plans_saved_by_one_process_run_on_two_ranks(runs):
    alone, parallel, _ = runs
    assert parallel["auto loaded stats"]["calibrations"] == 0
    assert_close(parallel["auto loaded from one process"], alone["auto"])


def test_plans_saved_by_two_ranks_run_in_one_process(runs):
    alone, _, folder = runs
    pipe = wan_pipe(None)
    sp = SparsePipeline(pipe, config("auto"))
    assert sp.load_plans(plan_file(folder, "auto", RANKS)) > 0
    out = run(sp, wan_inputs())
    assert sp.last_stats.calibrations == 0
    assert_close(out, alone["auto"])


def test_dense_context_and_removal_are_the_stock_context_parallel_pipeline_bit_exactly(runs):
    alone, parallel, _ = runs
    assert torch.equal(parallel["dense context"], parallel["stock"])
    assert torch.equal(parallel["removed"], parallel["stock"])
    assert_close(parallel["stock"], alone["stock"])


@pytest.mark.parametrize("family", ["ltx", "flux"])
def test_ltx_transformer_and_flux_on_two_ranks_generate_what_one_process_does(runs, family):
    alone, parallel, _ = runs
    assert parallel[f"{family} stats"]["sparse_calls"] > 0
    assert not torch.equal(alone[family], alone[f"{family} stock"])
    assert_close(parallel[family], alone[family])


def test_parallelism_enabled_after_sparse_attention_is_refused_until_applied_again(runs):
    alone, parallel, _ = runs
    after = parallel["parallel enabled after apply"]
    assert "enable_parallelism after apply_sparse_attention" in after["error"]
    assert "remove_sparse_attention" in after["error"]
    assert_close(after["applied again"], alone["auto"])


@pytest.mark.parametrize(("degrees", "message"), [
    ({"ring_degree": 2}, "runs ring attention.*Ulysses splits the heads.*ulysses_degree=2"),
    ({"ring_degree": 2, "ulysses_degree": 2}, "unified ring \\+ Ulysses attention.*cannot be split along the sequence"),
    ({"ulysses_degree": 2, "ulysses_anything": True}, "ulysses_anything=True.*even splits"),
    ({"ulysses_degree": 3}, "4 attention heads.*ulysses_degree=3"),
])
def test_ring_unified_uneven_and_indivisible_set_ups_are_refused(degrees, message):
    pipe = wan_pipe(None)
    record_parallel_config(pipe.transformer, **degrees)
    with pytest.raises(ValueError, match=message):
        apply_sparse_attention(pipe, config("auto"))


@pytest.mark.parametrize("family", ["hunyuan_video", "cogvideox"])
def test_models_without_a_diffusers_cp_plan_are_refused(tiny, family):
    case = tiny(family)
    transformer = case.pipe.transformer
    record_parallel_config(transformer, ulysses_degree=2)
    try:
        cls = type(transformer).__name__
        with pytest.raises(ValueError, match=f"supports for .*WanTransformer3DModel.*no _cp_plan for {cls}"):
            apply_sparse_attention(case.pipe, config("auto"))
    finally:
        del transformer._parallel_config


def _load(path) -> dict:
    """The plans of a file by key, loaded for the model and config it names."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["dit_sparse"])
    cache = PlanCache()
    cache.load(path, header["model"], header["config"])
    return dict(cache.items())
