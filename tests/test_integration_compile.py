"""dit-sparse under torch.compile, whole transformer and regional (``compile_repeated_blocks``), on
tiny Wan and Flux: the compiled run gives the eager sparse run's output, and the sparse processor
adds no graph per step: a second generation, and a longer one, compile nothing new (counted with
dynamo's counters). Each self-attention call is one explicit graph break, which
``fullgraph=True`` refuses with dit-sparse's reason."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import WAN_TRANSFORMER, build
from torch._dynamo.utils import counters

from dit_sparse import SparseAttentionConfig, apply_sparse_attention

CONFIG = SparseAttentionConfig(pattern="adaptive", density=0.4, block_size=16, dense_steps=2, dense_layers=())
BACKEND = "aot_eager"  # dynamo and AOTAutograd as inductor sees them, without its minutes of C++ builds on CPU


@pytest.fixture
def dynamo(one_thread):
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _compiled(family: str, region: str):
    """A tiny case with sparse attention and its transformer compiled: ``repeated_blocks``
    (regional), ``whole`` (``transformer.compile()`` after applying) or ``wrapped``
    (``torch.compile(transformer)`` put in the pipeline before applying)."""
    case = build(family)
    if region == "wrapped":
        case.pipe.transformer = torch.compile(case.pipe.transformer, backend=BACKEND)
    controller = apply_sparse_attention(case.pipe, CONFIG)
    if region == "repeated_blocks":
        case.pipe.transformer.compile_repeated_blocks(backend=BACKEND)
    elif region == "whole":
        case.pipe.transformer.compile(backend=BACKEND)
    return case, controller


@pytest.mark.parametrize(
    "family,region", [("wan", "repeated_blocks"), ("wan", "whole"), ("wan", "wrapped"), ("flux", "repeated_blocks"),
                      ("flux", "whole")],
)
def test_compiled_sparse_run_matches_eager_and_compiles_nothing_per_step(dynamo, family, region):
    eager = build(family)
    apply_sparse_attention(eager.pipe, CONFIG)
    expected = eager(num_inference_steps=3)
    longer = eager(num_inference_steps=5)

    case, controller = _compiled(family, region)
    torch.testing.assert_close(case(num_inference_steps=3), expected, rtol=1e-5, atol=1e-5)
    stats = controller.last_stats
    assert stats.sparse_calls > 0 and stats.calibrations > 0
    graphs = _graphs()
    assert graphs > 0
    torch.testing.assert_close(case(num_inference_steps=5), longer, rtol=1e-5, atol=1e-5)
    assert _graphs() == graphs  # two more sparse steps and a second generation: no new graph


@pytest.mark.parametrize("region", ["repeated_blocks", "whole"])
def test_graphs_do_not_grow_with_the_layers(dynamo, monkeypatch, region):
    graphs = []
    for layers in (2, 5):
        monkeypatch.setitem(WAN_TRANSFORMER, "num_layers", layers)
        torch._dynamo.reset()
        counters.clear()
        case, controller = _compiled("wan", region)
        case(num_inference_steps=3)
        assert controller.last_stats.sparse_calls == 2 * layers  # cond and uncond at the one sparse step
        graphs.append(_graphs())
    assert graphs[0] == graphs[1]


@pytest.mark.parametrize("region", ["repeated_blocks", "whole"])
def test_fullgraph_is_refused_with_the_reason(dynamo, region):
    case = build("wan")
    apply_sparse_attention(case.pipe, CONFIG)
    if region == "repeated_blocks":
        case.pipe.transformer.compile_repeated_blocks(backend=BACKEND, fullgraph=True)
    else:
        case.pipe.transformer.compile(backend=BACKEND, fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="compile without fullgraph=True"):
        case()
