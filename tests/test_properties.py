"""Property-based exactness: every attention backend that runs here equals the masked dense
reference on random layouts and plans.

Layouts: random video grids (odd sizes, single frames), text first or last with per-element
padding, batch and heads. Plans: block sizes 16 to 128 (partial last blocks), fixed blocks or
variable ones (random boundaries per head, empty blocks included, as cluster-aligned plans have),
random token orders, random block masks or bands (each row one run of key blocks), with rows forced
empty and rows forced full, per element
or shared by the batch. fp32 and bf16. The Triton kernels run in Triton's interpreter at small shapes when CUDA is
absent.

The hypothesis profile comes from ``HYPOTHESIS_PROFILE``: ``ci`` (the default: few, derandomized
examples, so the suite's time stays bounded) or ``thorough`` (many random examples)::

    HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py
"""

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dit_sparse import BlockSparsePlan, TokenLayout, sparse_attention
from dit_sparse.attention import _triton_available
from random_plans import random_orders, random_starts

settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
BLOCK_SIZES = st.sampled_from([16, 32, 64, 128])


@st.composite
def cases(draw, max_video: int = 400, max_text: int = 40, head_dims=(16, 32, 48)):
    """A layout, a plan over it, and random q, k, v for it."""
    grid = (draw(st.integers(1, 4)), draw(st.integers(1, 11)), draw(st.integers(1, 13)))
    if grid[0] * grid[1] * grid[2] > max_video:
        grid = (1, grid[1], grid[2])
    text_len = draw(st.integers(0, max_text))
    batch = draw(st.integers(1, 2))
    valid = None
    if text_len and draw(st.booleans()):
        valid = tuple(draw(st.integers(0, text_len)) for _ in range(batch))
    layout = TokenLayout(grid, text_len, draw(st.booleans()), valid)
    heads = draw(st.integers(1, 3))
    block = (draw(BLOCK_SIZES), draw(BLOCK_SIZES))
    plan_batch = draw(st.sampled_from([1, batch]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    starts = {"q_starts": None, "kv_starts": None}
    for name, size in zip(starts, block):
        if draw(st.booleans()):
            starts[name] = random_starts(layout, size, heads, plan_batch, g)
    n_q, n_k = (layout.num_blocks(size) if s is None else s.shape[-1] - 1 for s, size in zip(starts.values(), block))
    if draw(st.booleans()):
        mask = torch.rand(plan_batch, heads, n_q, n_k, generator=g) < draw(st.floats(0.0, 1.0))
    else:  # bands: each row's key blocks one run, the runs' starts equally far apart up to the edges
        width, step, shift = draw(st.integers(1, n_k)), draw(st.integers(0, 2)), draw(st.integers(-n_k, n_k))
        start = (torch.arange(n_q) * step + shift).clamp(0, n_k - width)
        band = (torch.arange(n_k) >= start[:, None]) & (torch.arange(n_k) < start[:, None] + width)
        mask = band.expand(plan_batch, heads, n_q, n_k).clone()
    rows = mask.view(-1, n_k)
    for _ in range(draw(st.integers(0, 3))):  # forced empty rows and forced full rows
        rows[int(torch.randint(rows.shape[0], (1,), generator=g))] = draw(st.booleans())
    orders = draw(st.booleans())
    q_order = random_orders(layout, heads, plan_batch, g) if orders else None
    kv_order = random_orders(layout, heads, plan_batch, g) if orders and draw(st.booleans()) else q_order
    plan = BlockSparsePlan.from_block_mask(mask, layout, block, q_order=q_order, kv_order=kv_order, **starts)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    dim = draw(st.sampled_from(head_dims))
    q, k, v = (torch.randn(batch, layout.seq_len, heads, dim, generator=g).to(dtype) for _ in range(3))
    return plan, q, k, v


def check_backend(backend: str, plan, q, k, v) -> None:
    ref = sparse_attention(q, k, v, plan, backend="torch_reference")
    out = sparse_attention(q, k, v, plan, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and not out.isnan().any()
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_the_reference_is_masked_dense_attention():
    """The reference itself, against softmax over an explicit score matrix, on one padded layout."""
    layout = TokenLayout((2, 3, 5), text_len=7, text_first=True, valid_text_len=(7, 2))
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 2, layout.num_blocks(16), layout.num_blocks(32), generator=g) < 0.4
    mask[0, 1, 0] = False
    plan = BlockSparsePlan.from_block_mask(mask, layout, (16, 32), q_order=random_orders(layout, 2, 2, g))
    q, k, v = (torch.randn(2, layout.seq_len, 2, 8, generator=g) for _ in range(3))
    allowed = plan.to_token_mask(2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    expected = torch.einsum("bhqk,bkhd->bqhd", weights, v)
    torch.testing.assert_close(sparse_attention(q, k, v, plan, backend="torch_reference"), expected, atol=1e-5, rtol=1e-5)


@given(cases())
def test_torch_backend_equals_the_reference(case):
    check_backend("torch", *case)


@given(cases())
def test_flex_backend_equals_the_reference(case):
    check_backend("flex", *case)


@pytest.mark.skipif(not _triton_available(), reason="the Triton kernels need triton: pip install -e '.[gpu]'")
@settings(max_examples=min(settings().max_examples, 12))
@given(cases(max_video=120, max_text=12, head_dims=(16,)))
def test_triton_backend_equals_the_reference(case):
    plan, q, k, v = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_backend("triton", plan.to(device), q.to(device), k.to(device), v.to(device))
