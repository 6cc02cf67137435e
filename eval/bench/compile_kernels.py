"""Compile the Triton kernels for a GPU architecture on a machine without a GPU, and report what each
configuration needs: registers per thread, spilled stack bytes and shared memory.

    python -m dit_sparse.eval.bench.compile_kernels               # sm_90 (H100, H200)
    python -m dit_sparse.eval.bench.compile_kernels --arch 80     # sm_80 (A100)

A kernel that does not lower, spills, or needs more shared memory than the device has shows here
before any GPU run. It uses Triton's ahead-of-time path (``triton.compile`` of an ``ASTSource``,
Triton >= 3.2 signatures) and the ``cuobjdump`` bundled with Triton; inputs are taken contiguous
(Triton specialises a unit head-dim stride at launch, which lets loads vectorise) with 16-divisible
pointers and strides.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dit_sparse.kernels import block_mass_triton as mass_module
from dit_sparse.kernels import block_sparse_attention_triton as attention_module
from dit_sparse.kernels.triton_utils import dot_settings, padded_head_dim

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
INPUT_POINTERS = ("Q", "K", "V", "Out")
POINTER_TYPES = {"Lse": "*fp32", "Mass": "*fp32", "KV_offsets": "*i64", "KV_counts": "*i32", "KV_indices": "*i32",
                 "KV_valid_len": "*i32", "Row_order": "*i32"}


def compile_kernel(fn, dtype: torch.dtype, constexprs: dict, config: dict, arch: int) -> dict:
    """Compile ``fn`` for ``sm_<arch>``; returns registers, spilled stack bytes and shared memory."""
    constexprs = {**constexprs, **{n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")}}
    constexprs.update({k: v for k, v in config.items() if k in fn.arg_names})
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTER_TYPES:
            signature[name] = POINTER_TYPES[name]
        elif name in INPUT_POINTERS:
            signature[name] = "*" + TRITON_TYPES[dtype]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or (name.startswith("stride_") and signature[name] != "constexpr")
    }
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs=constexprs, attrs=aligned), target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return {"registers": int(registers), "spilled_bytes": int(stack), "shared_bytes": kernel.metadata.shared}


def attention_entry(dtype: torch.dtype, dim: int, block_q: int, block_k: int, arch: int, with_values: bool = True) -> dict:
    dim_pad = padded_head_dim(dim)
    config = attention_module.tile_config(block_q, block_k, dim_pad, dtype)
    constexprs = {"BLOCK_Q": block_q, "BLOCK_K": block_k, "HEAD_DIM": dim, "HEAD_DIM_PAD": dim_pad,
                  "HAS_VALID_LEN": True, "WITH_VALUES": with_values, "RETURN_LSE": True, **dot_settings(dtype)}
    if not with_values:
        constexprs.update(V=None, Out=None)
    return {**config, **compile_kernel(attention_module._block_sparse_attention_fwd, dtype, constexprs, config, arch)}


def lse_entry(dtype: torch.dtype, dim: int, block_q: int, block_k: int, arch: int) -> dict:
    return attention_entry(dtype, dim, block_q, block_k, arch, with_values=False)


def mass_entry(dtype: torch.dtype, dim: int, block_q: int, block_k: int, arch: int) -> dict:
    dim_pad = padded_head_dim(dim)
    config = mass_module.mass_tile_config(block_q, block_k, dim_pad, dtype)
    constexprs = {"BLOCK_Q": block_q, "BLOCK_K": block_k, "HEAD_DIM": dim, "HEAD_DIM_PAD": dim_pad,
                  "HAS_VALID_LEN": True, **dot_settings(dtype)}
    return {**config, **compile_kernel(mass_module._block_mass_fwd, dtype, constexprs, config, arch)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 72, 256])
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128], help="plan block sizes (square)")
    args = parser.parse_args(argv)

    print(f"sm_{args.arch}, Triton {triton.__version__}")
    print("| kernel | dtype | D | block | BLOCK_M x BLOCK_N | warps | stages | registers | spilled bytes | shared KiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, entry), dtype, dim, block in itertools.product(
        [("attention", attention_entry), ("lse only", lse_entry), ("block mass", mass_entry)],
        args.dtypes, args.head_dims, args.blocks,
    ):
        r = entry(getattr(torch, dtype), dim, block, block, args.arch)
        print(f"| {name} | {dtype} | {dim} | {block} | {r['BLOCK_M']} x {r['BLOCK_N']} | {r['num_warps']} | "
              f"{r['num_stages']} | {r['registers']} | {r['spilled_bytes']} | {r['shared_bytes'] / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
