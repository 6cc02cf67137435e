import pytest
import torch

from dit_sparse.eval.synthetic import HEAD_TYPES, synthetic_attention

GRID = (6, 12, 16)


def attention(data, head):
    q, k = data.q[0, :, head], data.k[0, :, head]
    return (q @ k.T / q.shape[-1] ** 0.5).softmax(-1)


def coords(grid):
    t, h, w = grid
    idx = torch.arange(t * h * w)
    return idx // (h * w), (idx // w) % h, idx % w


@pytest.fixture(scope="module")
def data():
    return synthetic_attention(GRID, HEAD_TYPES, head_dim=32, seed=3)


def test_seeded_shapes_and_text():
    a = synthetic_attention((3, 5, 7), ["local", "sink"], head_dim=16, text_len=6, text_first=True, seed=1)
    b = synthetic_attention((3, 5, 7), ["local", "sink"], head_dim=16, text_len=6, text_first=True, seed=1)
    c = synthetic_attention((3, 5, 7), ["local", "sink"], head_dim=16, text_len=6, text_first=True, seed=2)
    assert a.q.shape == a.v.shape == (1, 111, 2, 16) and a.layout.text_first
    assert all(torch.equal(x, y) for x, y in zip((a.q, a.k, a.v), (b.q, b.k, b.v)))
    assert not torch.equal(a.q, c.q)
    with pytest.raises(ValueError, match="unknown head types"):
        synthetic_attention((2, 4, 4), ["diagonal"])
    with pytest.raises(ValueError, match="multiple of 8"):
        synthetic_attention((2, 4, 4), ["local"], head_dim=12)


def test_local_head_attends_its_neighbourhood(data):
    t, h, w = coords(GRID)
    p = attention(data, HEAD_TYPES.index("local"))
    near = ((t[:, None] - t[None]).abs() <= 1) & ((h[:, None] - h[None]).abs() <= 3) & ((w[:, None] - w[None]).abs() <= 3)
    assert near.float().mean() < 0.1
    assert (p * near).sum(-1).mean() > 0.5


def test_temporal_head_attends_the_same_position_in_every_frame(data):
    t, h, w = coords(GRID)
    same_place_far = ((t[:, None] - t[None]).abs() >= 2) & (h[:, None] == h[None]) & (w[:, None] == w[None])
    temporal = (attention(data, HEAD_TYPES.index("temporal")) * same_place_far).sum(-1).mean()
    local = (attention(data, HEAD_TYPES.index("local")) * same_place_far).sum(-1).mean()
    assert temporal > 0.2 and temporal > 5 * local


def test_sink_head_gives_a_few_keys_much_of_its_attention(data):
    p = attention(data, HEAD_TYPES.index("sink"))
    sinks = p.mean(0).topk(max(1, p.shape[0] // 1024)).indices
    assert p[:, sinks].sum(-1).mean() > 0.2
    assert attention(data, HEAD_TYPES.index("local"))[:, sinks].sum(-1).mean() < 0.05


def test_semantic_head_attends_far_frames_and_places(data):
    t, h, w = coords(GRID)
    far = ((t[:, None] - t[None]).abs() >= 2) & (((h[:, None] - h[None]).abs() + (w[:, None] - w[None]).abs()) >= 6)
    semantic = (attention(data, HEAD_TYPES.index("semantic")) * far).sum(-1).mean()
    local = (attention(data, HEAD_TYPES.index("local")) * far).sum(-1).mean()
    assert semantic > 0.3 and semantic > 3 * local
