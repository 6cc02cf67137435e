"""End-to-end time of a diffusers Wan pipeline at a real checkpoint's size: dense against the
library's default sparse configuration (``SparseAttentionConfig()``), in one run.

    python -m dit_sparse.eval.bench.pipeline --preset wan1.3b-480p   # GPU: Wan2.1-T2V-1.3B, 81 x 480 x 832, 50 steps
    python -m dit_sparse.eval.bench.pipeline --preset tiny           # any machine: a smoke-sized Wan

The transformer has the named checkpoint's architecture (layers, heads, widths, patch) and the VAE
Wan 2.1's, both with random weights drawn from ``--seed`` on the device; the prompt embeddings are
random too (the text encoder is left out: it runs once per call, dense and sparse alike). No weights
are downloaded. Random weights give near-uniform attention, so the sparse output's *quality* means
nothing here (that is measured on the trained reference model, docs/fidelity.md); what this measures
is *time* at the real shapes: the denoising loop (CFG included: two transformer calls per step),
calibration and attention inside it, and the VAE decode, timed once and added to both.

Each variant first runs a short untimed call (``--warmup-steps``; the sparse one reaches its sparse
steps, so the kernels are compiled), then ``--repeats`` timed calls in turns (dense, sparse, dense,
...), each synchronised on both sides. The run prints medians, the speedup and peak GPU memory.
With ``--plans saved``, the plans the sparse warm-up call calibrated go through a plan file
(``save_plans`` / ``load_plans``) and the timed sparse calls reuse them, as a deployment with saved
plans would: they skip calibration, whose time is then the warm-up call's, reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from dit_sparse import SparseAttentionConfig, SparsePipeline
from dit_sparse.eval.bench.attention import median_time
from dit_sparse.eval.harness.attention_timer import AttentionTimer
from dit_sparse.eval.harness.runner import timed_call
from dit_sparse.eval.machine import describe_machine, machine_info

# Wan2.1-T2V-1.3B's transformer config (its config.json on the Hugging Face Hub)
WAN_1_3B = {
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
PRESETS: dict[str, dict[str, Any]] = {
    # 81 frames at 480 x 832: a 21 x 60 x 104 latent, 21 x 30 x 52 = 32,760 tokens per transformer call
    "wan1.3b-480p": {"transformer": WAN_1_3B, "vae": {}, "text_len": 512, "frames": 81, "height": 480,
                     "width": 832, "steps": 50, "guidance_scale": 5.0},
    "tiny": {"transformer": {**WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 32, "text_dim": 32,
                             "ffn_dim": 64, "num_layers": 2},
             "vae": {"base_dim": 8, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}, "text_len": 8, "frames": 9,
             "height": 64, "width": 64, "steps": 4, "guidance_scale": 5.0},
}


def random_wan_pipeline(preset: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int):
    """A ``WanPipeline`` with the preset's transformer and VAE, random weights drawn from ``seed``
    on ``device`` (transformer in ``dtype``, VAE in fp32 as Wan's examples load it), no text encoder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = WanTransformer3DModel(**preset["transformer"]).to(dtype)
        vae = AutoencoderKLWan(**preset["vae"])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    preset = PRESETS[args.preset]
    pipe = random_wan_pipeline(preset, device, dtype, args.seed)
    text_dim = preset["transformer"]["text_dim"]
    embeds = torch.randn(2, preset["text_len"], text_dim, generator=torch.Generator().manual_seed(args.seed))
    call = {
        "prompt_embeds": embeds[:1].to(device, dtype), "negative_prompt_embeds": embeds[1:].to(device, dtype),
        "num_frames": args.frames, "height": args.height, "width": args.width,
        "guidance_scale": preset["guidance_scale"], "output_type": "latent",
    }
    sparse = SparsePipeline(pipe, SparseAttentionConfig())
    variants = {"dense": lambda **kw: _dense_call(sparse, **kw), "sparse": sparse}

    def kwargs(steps: int) -> dict[str, Any]:
        return {**call, "num_inference_steps": steps, "generator": torch.Generator(device).manual_seed(args.seed)}

    for fn in variants.values():
        fn(**kwargs(args.warmup_steps))
    warmup_calibration_s = sparse.last_stats.calibration_seconds
    print(f"warm-up done: the sparse call calibrated {sparse.last_stats.calibrations} plans in "
          f"{warmup_calibration_s:.2f} s", flush=True)
    if args.plans == "saved":
        with tempfile.TemporaryDirectory() as folder:
            sparse.save_plans(Path(folder) / "plans.safetensors")
            sparse.clear_plans()
            sparse.load_plans(Path(folder) / "plans.safetensors")
    walls: dict[str, list[float]] = {name: [] for name in variants}
    attention: dict[str, list[float]] = {name: [] for name in variants}
    peak_gib: dict[str, float | None] = {}
    with AttentionTimer(pipe) as timer:
        for _ in range(args.repeats):
            for name, fn in variants.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                output, wall, seconds = timed_call(fn, kwargs(args.steps), timer, device)
                walls[name].append(wall)
                attention[name].append(seconds["self"])
                peak_gib[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    stats = sparse.last_stats
    decode_s = _decode_seconds(pipe, output.frames, device)
    dense_s, sparse_s = (statistics.median(walls[name]) for name in variants)
    return {
        "preset": args.preset, "device": machine_info(device), "dtype": str(dtype).removeprefix("torch."),
        "frames": args.frames, "height": args.height, "width": args.width, "steps": args.steps,
        "config": SparseAttentionConfig().to_dict(), "repeats": args.repeats,
        "denoise_s": {"dense": dense_s, "sparse": sparse_s}, "walls_s": walls,
        "self_attention_s": {name: statistics.median(values) for name, values in attention.items()},
        "plans": args.plans, "calibration_s": stats.calibration_seconds,
        "warmup_calibration_s": warmup_calibration_s, "mean_sparse_density": stats.mean_sparse_density,
        "sparse_calls": stats.sparse_calls, "attention_calls": stats.attention_calls,
        "decode_s": decode_s, "peak_gib": peak_gib,
        "denoise_speedup": dense_s / sparse_s, "end_to_end_speedup": (dense_s + decode_s) / (sparse_s + decode_s),
    }


def _dense_call(sparse: SparsePipeline, **kwargs: Any) -> Any:
    with sparse.dense():
        return sparse(**kwargs)


def _decode_seconds(pipe, latents: torch.Tensor, device: torch.device) -> float:
    """Time of one VAE decode of ``latents`` (un-normalised as ``WanPipeline`` does), in seconds."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    z = latents.to(vae.dtype) * std + mean
    with torch.no_grad():
        return median_time(lambda: vae.decode(z), warmup=0, repeats=1, device=device) / 1e3


def format_report(result: dict[str, Any]) -> str:
    denoise, attention, peak = result["denoise_s"], result["self_attention_s"], result["peak_gib"]
    decode = result["decode_s"]
    lines = [
        "| variant | denoising loop s | of which self-attention s | calibration in the call s | VAE decode s "
        "| end to end s | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("dense", "sparse"):
        calibration = f"{result['calibration_s']:.2f}" if name == "sparse" else "-"
        gib = "-" if peak[name] is None else f"{peak[name]:.1f}"
        lines.append(f"| {name} | {denoise[name]:.2f} | {attention[name]:.2f} | {calibration} | {decode:.2f} "
                     f"| {denoise[name] + decode:.2f} | {gib} |")
    if result["plans"] == "saved":
        lines.append(f"sparse calls reuse saved plans; calibrating them took {result['warmup_calibration_s']:.2f} s "
                     f"in the warm-up call (kernel compiles included)")
    density = result["mean_sparse_density"]
    lines.append(f"sparse calls {result['sparse_calls']} of {result['attention_calls']} self-attention calls, mean density "
                 f"{'-' if density is None else f'{density:.3f}'}; speedup: denoising loop "
                 f"{result['denoise_speedup']:.2f}x, end to end {result['end_to_end_speedup']:.2f}x, self-attention "
                 f"{attention['dense'] / attention['sparse']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="wan1.3b-480p")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup-steps", type=int, default=4, help="steps of each variant's untimed first call")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls of each variant, in turns")
    parser.add_argument("--plans", choices=["calibrate", "saved"], default="calibrate",
                        help="sparse calls calibrate their plans (default) or reuse the warm-up call's, saved to a file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="the transformer's dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    parser.set_defaults(**{k: preset[k] for k in ("frames", "height", "width", "steps")})
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup_steps < 2:
        parser.error("--repeats must be >= 1 and --warmup-steps >= 2 (the warm-up must reach a sparse step)")
    result = run(args)
    print(f"{args.preset}: {args.frames} frames at {args.height} x {args.width}, {args.steps} steps, "
          f"{result['dtype']}, random weights, SparseAttentionConfig() defaults; {describe_machine(result['device'])}")
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "result": result}, f, indent=2)


if __name__ == "__main__":
    main()
