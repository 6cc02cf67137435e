"""The Triton kernels against independent references: the ``torch_reference`` backend, a dense
log-sum-exp and a dense softmax pooled into blocks. Without CUDA they run in Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py) at small shapes; with CUDA, compiled, and the ``cuda``
variants (plus a few larger shapes) run instead."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip(
    "triton", reason="the Triton kernel tests need triton: pip install -e '.[gpu]' (CUDA builds of torch bring it)"
)

from dit_sparse import BlockSparsePlan, TokenLayout, sparse_attention
from dit_sparse.attention import attention_in_plan_order
from dit_sparse.calibration import measure_block_mass
from dit_sparse.kernels import triton_utils
from dit_sparse.kernels.block_mass_torch import block_mass_torch
from dit_sparse.kernels.block_mass_triton import block_mass_triton
from dit_sparse.kernels.block_sparse_attention_triton import (
    block_sparse_attention_triton,
    block_sparse_lse_triton,
    heavy_first_row_order,
)
from random_plans import random_orders, random_plan, random_starts

INTERPRETED = triton_utils.interpreting()
CUDA = torch.cuda.is_available() and not INTERPRETED
KERNEL_DEVICE = "cuda" if CUDA else "cpu"  # where the kernels run on this machine: compiled, or interpreted

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="CPU runs need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="compiled runs need a CUDA GPU")),
]

CASES = [
    # grid, text_len, text_first, valid_text_len, batch, block_size, head_dim
    ((3, 7, 9), 0, False, None, 1, 32, 32),              # 189 tokens: partial last blocks, empty rows
    ((2, 5, 7), 13, False, None, 2, 16, 32),             # text last; each batch element its own plan
    ((2, 5, 7), 13, True, (13, 4), 2, (32, 16), 48),     # text first, padded; D not a power of two
    ((2, 4, 6), 21, False, (0, 21), 2, (16, 32), 72),    # element 0's text all padding; D = 72
    ((2, 8, 8), 7, True, None, 1, 64, 64),               # blocks of 64
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def make_case(case, dtype, device, heads=2, seed=0):
    grid, text_len, text_first, valid, batch, block, dim = case
    layout = TokenLayout(grid, text_len, text_first, valid)
    plan = random_plan(layout, heads=heads, block_size=block, batch=batch, density=0.3, empty_rows=2, seed=seed)
    q, k, v = (torch.randn(batch, layout.seq_len, heads, dim).to(device, dtype) for _ in range(3))
    return plan.to(device), q, k, v


def tolerance(dtype):
    return TOLERANCE[dtype] if INTERPRETED or dtype != torch.float32 else 1e-4


def in_plan_order(x, plan, which):
    """``(B, S, H, D)`` -> ``[B, H, S, D]`` gathered into the plan's token order."""
    order = plan.order(which, x.shape[0])
    return x.transpose(1, 2).gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))


def dense_lse(q, k, plan):
    """Per query, the natural-log log-sum-exp of its scaled scores over the keys it attends, in the
    plan's query order (``-inf`` where it attends none)."""
    batch = q.shape[0]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    lse = scores.masked_fill(~plan.to_token_mask(batch), float("-inf")).logsumexp(-1)
    return lse.gather(2, plan.order("q", batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_sparse_attention_triton_matches_reference(case, dtype, device):
    plan, q, k, v = make_case(case, dtype, device)
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    out = sparse_attention(q, k, v, plan, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape and not out.isnan().any()
    tol = tolerance(dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_variable_blocks_match_reference_and_their_lse(device):
    """Cluster-aligned style plans: per-head variable blocks (empty ones included) of at most the
    block size, larger than the tiles (several query tiles per block, several key tiles per block),
    padded text; output and lse against the references."""
    layout = TokenLayout((2, 5, 7), text_len=13, text_first=True, valid_text_len=(13, 4))
    g = torch.Generator().manual_seed(4)
    batch, heads = 2, 2
    starts = {"q_starts": random_starts(layout, 32, heads, batch, g), "kv_starts": random_starts(layout, 64, heads, batch, g)}
    mask = torch.rand(batch, heads, starts["q_starts"].shape[-1] - 1, starts["kv_starts"].shape[-1] - 1, generator=g) < 0.4
    plan = BlockSparsePlan.from_block_mask(mask, layout, (32, 64), q_order=random_orders(layout, heads, batch, g),
                                           kv_order=random_orders(layout, heads, batch, g), **starts).to(device)
    q, k, v = (torch.randn(batch, layout.seq_len, heads, 16, generator=g).to(device) for _ in range(3))
    tol = tolerance(torch.float32)
    torch.testing.assert_close(sparse_attention(q, k, v, plan, backend="triton").float(),
                               sparse_attention(q, k, v, plan, backend="torch_reference").float(), atol=tol, rtol=tol)
    qp, kp, vp = in_plan_order(q, plan, "q"), in_plan_order(k, plan, "kv"), in_plan_order(v, plan, "kv")
    _, lse = block_sparse_attention_triton(qp, kp, vp, *plan_rows(plan), kv_valid_len=plan.layout.key_valid_len(batch),
                                           return_lse=True, q_starts=plan.q_starts, kv_starts=plan.kv_starts)
    expected = dense_lse(q, k, plan)
    assert torch.equal(lse.isneginf(), expected.isneginf())
    torch.testing.assert_close(lse, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[1:4])
def test_lse_matches_dense_logsumexp(case, dtype, device):
    plan, q, k, v = make_case(case, dtype, device, seed=3)
    batch = q.shape[0]
    qp, kp, vp = in_plan_order(q, plan, "q"), in_plan_order(k, plan, "kv"), in_plan_order(v, plan, "kv")
    valid = plan.layout.key_valid_len(batch)
    _, lse = block_sparse_attention_triton(qp, kp, vp, *plan_rows(plan), kv_valid_len=valid, return_lse=True)
    expected = dense_lse(q, k, plan)
    assert lse.dtype == torch.float32 and lse.shape == expected.shape
    assert torch.equal(lse.isneginf(), expected.isneginf())
    torch.testing.assert_close(lse, expected, atol=1e-4, rtol=1e-5)
    lse_only = block_sparse_lse_triton(qp, kp, *plan_rows(plan), kv_valid_len=valid)
    torch.testing.assert_close(lse_only, lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded_text", [False, True])
def test_rows_without_keys_give_zeros_and_minus_infinity(padded_text, device):
    """A query block with no key block, or whose only keys are text padding."""
    layout = TokenLayout((2, 8, 6), text_len=32, valid_text_len=(0,)) if padded_text else TokenLayout((2, 8, 8))
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2, : 3 if padded_text else 4] = False
    plan = BlockSparsePlan.from_block_mask(mask, layout, 32).to(device)
    q, k, v = (torch.randn(1, 2, 128, 32, device=device) for _ in range(3))
    valid = plan.layout.key_valid_len(1)
    out, lse = block_sparse_attention_triton(q, k, v, *plan_rows(plan), kv_valid_len=valid, return_lse=True)
    assert out[0, 1, 64:96].eq(0).all() and lse[0, 1, 64:96].isneginf().all()
    assert out[0, 0, 64:96].abs().sum() > 0 and lse[0, 0].isfinite().all() and not out.isnan().any()
    for backend in ("flex", "torch_reference"):
        assert sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan, backend)[0, 64:96, 1].eq(0).all()


def test_row_order_changes_nothing_but_the_schedule(device):
    plan, q, k, v = make_case(CASES[1], torch.float32, device, seed=5)
    args = (*(in_plan_order(x, plan, w) for x, w in ((q, "q"), (k, "kv"), (v, "kv"))), *plan_rows(plan))
    heavy = block_sparse_attention_triton(*args)
    shuffled = torch.randperm(plan.kv_counts.numel()).to(device)
    assert torch.equal(block_sparse_attention_triton(*args, row_order=shuffled), heavy)


def test_heavy_first_row_order():
    counts = torch.tensor([[[2, 5, 0], [5, 1, 3]]])
    order = heavy_first_row_order(counts, batch_size=2)
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(12))
    assert counts.expand(2, -1, -1).reshape(-1)[order.long()].tolist() == [5, 5, 5, 5, 3, 3, 2, 2, 1, 1, 0, 0]
    assert order[:4].tolist() == [1, 3, 7, 9]  # ties keep their natural order


def test_full_plan_with_big_blocks_equals_sdpa(device):
    """Blocks of 128 queries and keys (split into several tiles per program) over a full plan."""
    layout = TokenLayout((2, 9, 11), text_len=5)
    n = layout.num_blocks(128)
    plan = BlockSparsePlan.from_block_mask(torch.ones(1, 1, n, n, dtype=torch.bool), layout, 128).to(device)
    q, k, v = (torch.randn(1, 1, layout.seq_len, 64, device=device) for _ in range(3))
    out = block_sparse_attention_triton(q, k, v, *plan_rows(plan))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=tolerance(torch.float32), rtol=1e-4)


def dense_block_mass(q, k, block_q, block_k, valid):
    """Softmax of the full score matrix, summed over key blocks and averaged over each query block's
    real queries."""
    batch, heads, seq, dim = q.shape
    scores = (q.float() @ k.float().transpose(-1, -2)) * dim**-0.5
    if valid is not None:
        padding = torch.arange(seq, device=q.device)[None, :] >= valid.to(q.device)[:, None]
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    n_q, n_k = -(-seq // block_q), -(-seq // block_k)
    probs = F.pad(probs, (0, n_k * block_k - seq, 0, n_q * block_q - seq))
    summed = probs.view(batch, heads, n_q, block_q, n_k, block_k).sum((3, 5))
    real = (seq - torch.arange(n_q, device=q.device) * block_q).clamp(max=block_q)
    return summed / real[:, None]


MASS_CASES = [
    # seq, blocks, head_dim, valid lengths
    (150, (32, 32), 32, None),
    (167, (16, 32), 48, (150, 90)),
    (150, (128, 32), 256, (140,)),   # fp32 at D = 256 splits a query block over two programs
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seq,blocks,dim,valid", MASS_CASES)
def test_block_mass_matches_dense_softmax(seq, blocks, dim, valid, dtype, device):
    valid = None if valid is None else torch.tensor(valid, device=device)
    batch = 1 if valid is None else valid.numel()
    q, k = (torch.randn(batch, 2, seq, dim, device=device).to(dtype) for _ in range(2))
    mass = block_mass_triton(q, k, *blocks, kv_valid_len=valid)
    expected = dense_block_mass(q, k, *blocks, valid)
    assert mass.dtype == torch.float32 and mass.shape == expected.shape
    torch.testing.assert_close(mass, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass[..., 0]), atol=1e-5, rtol=0)
    if valid is not None:
        first_padded_block = int(valid.min()) // blocks[1] + 1
        assert mass[valid.argmin(), ..., first_padded_block:].eq(0).all()


def test_block_mass_takes_a_given_lse(device):
    q, k = (torch.randn(1, 2, 100, 32, device=device) for _ in range(2))
    lse = torch.randn(1, 2, 100, device=device)
    mass = block_mass_triton(q, k, 32, 32, lse=lse, scale=0.3)
    scores = (q @ k.transpose(-1, -2)) * 0.3
    probs = F.pad((scores - lse[..., None]).exp(), (0, 28, 0, 28)).view(1, 2, 4, 32, 4, 32).sum((3, 5))
    torch.testing.assert_close(mass, probs / torch.tensor([32, 32, 32, 4], device=device)[:, None], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_mass_matches_its_torch_twin(dtype, device):
    valid = torch.tensor([150, 90], device=device)
    q, k = (torch.randn(2, 2, 167, 48, device=device).to(dtype) for _ in range(2))
    expected = block_mass_torch(q, k, 16, 32, kv_valid_len=valid)
    torch.testing.assert_close(block_mass_triton(q, k, 16, 32, kv_valid_len=valid), expected, atol=1e-5, rtol=1e-4)


def test_calibration_measures_with_the_triton_kernel(device):
    layout = TokenLayout((2, 8, 8), text_len=9, valid_text_len=(9, 3))
    q, k = (torch.randn(2, layout.seq_len, 2, 32, device=device) for _ in range(2))
    order = layout.tile_order((1, 4, 8)).to(device)
    expected = measure_block_mass(q, k, layout, 32, order=order, backend="torch")
    torch.testing.assert_close(measure_block_mass(q, k, layout, 32, order=order, backend="triton"), expected,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]])
def test_sparse_attention_flex_matches_reference(case, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    plan, q, k, v = make_case((*case[:-1], 64), dtype, device, seed=2)
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    out = sparse_attention(q, k, v, plan, backend="flex")
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=tolerance(dtype), rtol=tolerance(dtype))


def test_attention_in_plan_order_is_the_kernel_between_the_gathers():
    plan, q, k, v = make_case(CASES[2], torch.float32, "cpu", seed=4)
    qp, kp, vp = in_plan_order(q, plan, "q"), in_plan_order(k, plan, "kv"), in_plan_order(v, plan, "kv")
    expected = in_plan_order(sparse_attention(q, k, v, plan, backend="torch"), plan, "q")
    torch.testing.assert_close(attention_in_plan_order(qp, kp, vp, plan, backend="torch"), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="original token order"):
        attention_in_plan_order(qp, kp, vp, plan, backend="torch_reference")


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda q: {"q": q.double(), "k": q.double(), "v": q.double()}, TypeError, "fp32, fp16 and bf16"),
        (lambda q: {"k": q[:, :, :-1]}, ValueError, "one \\[B, H, S, D\\] shape"),
        (lambda q: {"block_size_q": 48}, ValueError, "power-of-two block sizes"),
        (lambda q: {"kv_counts": torch.ones(1, 2, 3, dtype=torch.int32, device=q.device)}, ValueError,
         "kv_counts must be"),
        (lambda q: {"kv_valid_len": torch.tensor([1, 2], device=q.device)}, ValueError, "kv_valid_len must be"),
        (lambda q: {"row_order": torch.arange(3, device=q.device)}, ValueError, "row_order must hold"),
    ],
)
def test_bad_inputs_are_rejected(change, error, match):
    q = torch.randn(1, 2, 64, 16, device=KERNEL_DEVICE)
    args = dict(q=q, k=q, v=q, kv_counts=torch.ones(1, 2, 2, dtype=torch.int32, device=q.device),
                kv_offsets=torch.zeros(1, 2, 2, dtype=torch.int64, device=q.device),
                kv_indices=torch.zeros(1, dtype=torch.int32, device=q.device), block_size_q=32, block_size_k=32)
    with pytest.raises(error, match=match):
        block_sparse_attention_triton(**{**args, **change(q)})


def test_head_dim_over_256_and_host_tensors_without_interpreter_are_rejected(monkeypatch):
    q = torch.randn(1, 1, 32, 264, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="head dim 264"):
        block_mass_triton(q, q, 16, 16)
    q = q.cpu()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        block_mass_triton(q[..., :64], q[..., :64], 16, 16)


def test_launch_falls_back_to_configs_that_fit(monkeypatch):
    """A device short of shared memory: configs are tried from the largest down, the fitting one is
    remembered."""
    monkeypatch.setattr(triton_utils, "_FITTING_CONFIGS", {})
    launched = []

    class SmallDevice:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                if kwargs["BLOCK_N"] * kwargs["num_stages"] > 32:
                    raise triton.OutOfResources(1, 0, "shared memory")
                launched.append((grid, kwargs))

            return run

    config = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    for _ in range(2):
        triton_utils.launch(SmallDevice(), lambda c: (c["BLOCK_M"],), config, ("key",), HEAD_DIM=64)
    fitting = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
    assert launched == [((128,), {"HEAD_DIM": 64, **fitting})] * 2
    assert triton_utils.smaller_configs(config)[:4] == [
        {**config, "num_stages": 3}, {**config, "num_stages": 2}, {**config, "num_stages": 1},
        {**config, "BLOCK_N": 32, "num_stages": 3},
    ]


@pytest.mark.skipif(not CUDA, reason="compiled runs need a CUDA GPU")
@pytest.mark.parametrize("block", [64, 128, (128, 64)])
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_shapes_match_torch_backend(block, dim):
    """Production-like shapes, compiled: Wan-like grid with text padding, bf16."""
    layout = TokenLayout((5, 20, 30), text_len=77, valid_text_len=(77, 30))
    plan = random_plan(layout, heads=4, block_size=block, batch=2, density=0.2, seed=1).to("cuda")
    q, k, v = (torch.randn(2, layout.seq_len, 4, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = sparse_attention(q, k, v, plan, backend="torch")
    for backend in ("triton", "flex"):
        out = sparse_attention(q, k, v, plan, backend=backend)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    mass = block_mass_triton(q.transpose(1, 2), k.transpose(1, 2), 64, 64, kv_valid_len=plan.layout.key_valid_len(2).cuda())
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass[..., 0]), atol=1e-4, rtol=0)


def plan_rows(plan):
    return plan.kv_counts, plan.kv_offsets, plan.kv_indices, plan.block_size_q, plan.block_size_k
