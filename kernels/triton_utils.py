"""What the Triton kernels share: input checks, dot settings and one masked tile load.

Under ``TRITON_INTERPRET=1`` (the CPU test path) ``tl.dot`` on bf16 operands returns garbage, while
fp16 and fp32 are exact; :func:`dot_settings` then asks the kernels to upcast their dot operands to
fp32. Compiled GPU runs never upcast.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

_FITTING_CONFIGS: dict[tuple, int] = {}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_settings(dtype: torch.dtype) -> dict:
    """Constexprs for ``tl.dot``: ``DOT_FP32`` upcasts bf16 operands under the interpreter (whose bf16
    dot is broken); ``DOT_PRECISION`` runs fp32 inputs as 3xTF32 on tensor cores, about as accurate as
    fp32 (plain TF32 is not; an "ieee" FMA dot spills badly). Ignored for 16-bit operands."""
    return {
        "DOT_FP32": dtype == torch.bfloat16 and interpreting(),
        "DOT_PRECISION": "tf32x3" if dtype == torch.float32 else "tf32",
    }


def check_block_size(name: str, block: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"the Triton kernels need power-of-two block sizes >= 16, got {name}={block}")


def check_qk(*tensors: torch.Tensor) -> tuple[int, int, int, int]:
    """Check ``[B, H, S, D]`` inputs of one shape, dtype and device; returns ``(B, H, S, D)``."""
    first = tensors[0]
    if first.dim() != 4 or any(t.shape != first.shape for t in tensors):
        raise ValueError(f"inputs must share one [B, H, S, D] shape, got {[tuple(t.shape) for t in tensors]}")
    if first.dtype not in DTYPES or any(t.dtype != first.dtype for t in tensors):
        raise TypeError(f"inputs must share one dtype among fp32, fp16 and bf16, got {[t.dtype for t in tensors]}")
    if any(t.device != first.device for t in tensors):
        raise ValueError("inputs must be on one device")
    if first.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {first.device}"
        )
    if first.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {first.shape[-1]} is not supported: the Triton kernels take D <= {MAX_HEAD_DIM}")
    return tuple(first.shape)


def check_valid_len(kv_valid_len: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    if kv_valid_len is None:
        return None
    if kv_valid_len.shape != (batch,):
        raise ValueError(f"kv_valid_len must be [B] = [{batch}], got {tuple(kv_valid_len.shape)}")
    return kv_valid_len.to(device=device, dtype=torch.int32).contiguous()


def padded_head_dim(dim: int) -> int:
    """Head dims are padded to a power of two (at least 16, the smallest ``tl.dot`` size)."""
    return max(16, triton.next_power_of_2(dim))


def smaller_configs(config: dict) -> list[dict]:
    """``config``, then the same tiles with fewer pipeline stages, then ever smaller tiles (``BLOCK_N``
    halved first, both down to 16), each again from ``config``'s stages down to 1."""
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    configs = []
    while True:
        for stages in range(config["num_stages"], 0, -1):
            configs.append({**config, "BLOCK_M": block_m, "BLOCK_N": block_n, "num_stages": stages})
        if block_n > 16:
            block_n //= 2
        elif block_m > 16:
            block_m //= 2
        else:
            return configs


def launch(kernel, grid: Callable[[dict], tuple], config: dict, key: tuple, *args, **constexprs) -> None:
    """Launch ``kernel[grid(config)](*args, **constexprs, **config)``; on a GPU without the shared
    memory ``config`` needs (the tile sizes target sm_90), fall back along :func:`smaller_configs` to
    the first that fits, and start from it for ``key`` next time."""
    candidates = smaller_configs(config)
    for index in range(_FITTING_CONFIGS.get(key, 0), len(candidates)):
        try:
            kernel[grid(candidates[index])](*args, **constexprs, **candidates[index])
        except triton.OutOfResources:
            continue
        _FITTING_CONFIGS[key] = index
        return
    raise RuntimeError(f"no tile configuration of {getattr(kernel, '__name__', kernel)} fits this device")


@triton.jit
def load_tile(base, rows, offs_d, stride_s, stride_d, n_rows, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A ``[len(rows), len(offs_d)]`` tile; rows at or past ``n_rows`` (when ``MASK_ROWS``) and head-dim
    padding read as zeros."""
    ptrs = base + rows[:, None] * stride_s + offs_d[None, :] * stride_d
    if MASK_ROWS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM < offs_d.shape[0]:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile
