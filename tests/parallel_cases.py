"""What tests/test_parallel.py runs once in one process and once on each of two Ulysses ranks: tiny
Wan, LTX-Video and Flux pipelines with classifier-free guidance, sparse under every pattern.

``run_cases(folder, mesh)`` returns the outputs and statistics by case name and writes the plan
files to ``folder``; with a device mesh, diffusers' context parallelism is enabled on it first.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers import (
    ContextParallelConfig, FlowMatchEulerDiscreteScheduler, ParallelConfig, WanPipeline, WanTransformer3DModel,
)

from dit_sparse import SparseAttentionConfig, SparsePipeline, apply_sparse_attention, remove_sparse_attention
from dit_sparse.config import PATTERNS, PRESETS
from tiny_pipelines import WAN_TRANSFORMER, build

WAN_HEADS = {**WAN_TRANSFORMER, "num_attention_heads": 4}  # two heads per rank
RANKS = 2
PLANNED = [p for p in PATTERNS if p != "dense"]  # "dense" runs the hooks but never plans


def config(pattern: str) -> SparseAttentionConfig:
    """Every layer sparse after one dense step, on the tiny 80-token videos (blocks of 16)."""
    tiny = {"block_size": 16, "dense_steps": 1, "dense_layers": (), "query_clusters": 4, "key_clusters": 8}
    if pattern in PRESETS:
        return SparseAttentionConfig.preset(pattern, **tiny)
    return SparseAttentionConfig(pattern=pattern, density=0.4, **tiny)


def plan_file(folder: Path, name: str, ranks: int) -> Path:
    return folder / f"{name}-{ranks}.safetensors"


def wan_pipe(mesh: Any) -> Any:
    """Tiny Wan T2V with four heads, context-parallel on ``mesh`` when one is given."""
    torch.manual_seed(0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=WanTransformer3DModel(**WAN_HEADS),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    enable_ulysses(pipe.transformer, mesh)
    return pipe


def enable_ulysses(transformer: torch.nn.Module, mesh: Any) -> None:
    """Ulysses over ``mesh`` on ``transformer`` (nothing without a mesh)."""
    if mesh is not None:
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=RANKS, mesh=mesh))


WAN_INPUTS = {"height": 64, "width": 64, "num_frames": 17, "guidance_scale": 5.0}


def wan_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    text, negative = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    return {"prompt_embeds": text, "negative_prompt_embeds": negative, **WAN_INPUTS}


def run(runner: Any, inputs: dict[str, Any], steps: int = 4) -> torch.Tensor:
    seed = torch.Generator().manual_seed(0)
    return runner(**inputs, num_inference_steps=steps, output_type="latent", generator=seed)[0]


def run_cases(folder: Path, mesh: Any) -> dict[str, Any]:
    """Every case; ``mesh``: a ``("ring", "ulysses")`` device mesh of shape ``(1, 2)``, or ``None``."""
    ranks = 1 if mesh is None else RANKS
    results: dict[str, Any] = {}
    pipe = wan_pipe(mesh)
    inputs = wan_inputs()
    results["stock"] = run(pipe, inputs)
    for pattern in PATTERNS:
        sp = SparsePipeline(pipe, config(pattern))
        results[pattern] = run(sp, inputs)
        results[f"{pattern} stats"] = sp.last_stats.to_dict()
        if pattern in PLANNED:
            sp.save_plans(plan_file(folder, pattern, ranks))
    sp = SparsePipeline(pipe, replace(config("auto"), balance_heads=True))
    results["auto balanced"] = run(sp, inputs)
    results["auto balanced stats"] = sp.last_stats.to_dict()
    sp.save_plans(plan_file(folder, "auto balanced", ranks))
    for name, bound in (("checked", float("inf")), ("replanned balanced", 0.0)):
        sp = SparsePipeline(pipe, replace(config("auto"), recalibrate_error=bound, balance_heads=bound == 0.0))
        results[f"auto {name}"] = run(sp, inputs)
        results[f"auto {name} stats"] = sp.last_stats.to_dict()
    with sp.dense():
        results["dense context"] = run(sp, inputs)
    remove_sparse_attention(pipe)
    results["removed"] = run(pipe, inputs)

    if mesh is not None:
        sp = SparsePipeline(pipe, config("auto"))
        sp.load_plans(plan_file(folder, "auto", 1))
        results["auto loaded from one process"] = run(sp, inputs)
        results["auto loaded stats"] = sp.last_stats.to_dict()
        remove_sparse_attention(pipe)
        results["parallel enabled after apply"] = _enabled_after_apply(inputs, mesh)

    results.update(_ltx_transformer(mesh))
    case = build("flux")
    enable_ulysses(case.pipe.transformer, mesh)
    inputs = {**case.inputs, **_flux_negative()}
    results["flux stock"] = run(case.pipe, inputs, case.steps)
    sp = SparsePipeline(case.pipe, config("auto"))
    results["flux"] = run(sp, inputs, case.steps)
    results["flux stats"] = sp.last_stats.to_dict()
    return results


def _ltx_transformer(mesh: Any) -> dict[str, Any]:
    """LTX-Video's transformer on a batched CFG call ``[uncond, cond]`` at three steps. Without a text
    mask: LTXPipeline's mask fails diffusers' own Ulysses cross-attention (its per-head mask keeps
    every head while each rank holds half of them), sparse attention or not."""
    transformer = build("ltx").pipe.transformer
    enable_ulysses(transformer, mesh)
    g = torch.Generator().manual_seed(3)
    latents, text = torch.randn(2, 48, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    inputs = {"hidden_states": latents, "encoder_hidden_states": text, "encoder_attention_mask": None,
              "num_frames": 3, "height": 4, "width": 4, "return_dict": False}

    def steps() -> torch.Tensor:
        outputs = []
        for t in (900.0, 600.0, 300.0):
            with torch.no_grad(), transformer.cache_context("cond_uncond"):
                outputs.append(transformer(**inputs, timestep=torch.full((2,), t))[0])
        return torch.stack(outputs)

    results = {"ltx stock": steps()}
    controller = apply_sparse_attention(transformer, config("auto"))
    results["ltx"] = steps()
    controller.finish_generation()
    results["ltx stats"] = controller.last_stats.to_dict()
    return results


def _flux_negative() -> dict[str, Any]:
    """True classifier-free guidance for Flux (two calls per step)."""
    g = torch.Generator().manual_seed(2)
    return {"negative_prompt_embeds": torch.randn(1, 8, 32, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(1, 32, generator=g), "true_cfg_scale": 2.0}


def _enabled_after_apply(inputs: dict[str, Any], mesh: Any) -> dict[str, Any]:
    """Sparse attention applied first, context parallelism enabled after: refused at the call;
    removing and applying again runs."""
    pipe = wan_pipe(None)
    sp = SparsePipeline(pipe, config("auto"))
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=RANKS, mesh=mesh))
    try:
        run(sp, inputs)
        error = None
    except RuntimeError as e:
        error = str(e)
    sp.remove()
    return {"error": error, "applied again": run(SparsePipeline(pipe, config("auto")), inputs)}


def worker(rank: int, port: int, folder: Path) -> None:
    """One Ulysses rank of the two: runs every case; rank 0 writes the results."""
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # diffusers picks the device as rank % accelerator count: 0 on a CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS,
                            timeout=datetime.timedelta(seconds=120))
    try:
        mesh = dist.device_mesh.init_device_mesh("cpu", (1, RANKS), mesh_dim_names=("ring", "ulysses"))
        results = run_cases(folder, mesh)
        if rank == 0:
            torch.save(results, folder / "parallel.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skips interpreter finalisation, where gloo's worker threads can still hold tensors and abort
    # the process (SIGABRT, "terminate called without an active exception") after its work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def record_parallel_config(transformer: torch.nn.Module, **context_parallel: Any) -> ParallelConfig:
    """A transformer's parallel config as ``enable_parallelism`` records it (without its device
    mesh, which the refusals never reach)."""
    transformer._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**context_parallel))
    return transformer._parallel_config
