from dit_sparse.eval.harness.attention_timer import AttentionTimer
from dit_sparse.eval.harness.models import EvalModel, GenerationSettings
from dit_sparse.eval.harness.offline_model import OfflineWanSpec, build_offline_pipeline


def test_the_timer_counts_every_attention_call_and_its_dense_flops():
    spec = OfflineWanSpec(num_layers=2)
    pipe = build_offline_pipeline(spec)
    pipe.set_progress_bar_config(disable=True)
    model = EvalModel(pipe, "tiny offline Wan", random_weights=True, offline_spec=spec)
    settings = GenerationSettings(steps=3, frames=9, height=32, width=32, guidance_scale=1.0)
    kwargs = model.call_kwargs("a red fox", settings)
    timer = AttentionTimer(pipe)
    assert timer.self_attention_layers == {"transformer.blocks.0.attn1": ("transformer", 0),
                                           "transformer.blocks.1.attn1": ("transformer", 1)}
    with timer:
        pipe(**kwargs)
    tokens = spec.video_tokens(frames=9, height=32, width=32)
    assert tokens == 3 * 8 * 8
    inner = spec.num_heads * spec.head_dim
    per_call = 4 * tokens**2 * inner                                        # QK^T and PV, batch 1
    assert timer.self_attention_flops() == {("transformer", 0): per_call, ("transformer", 1): per_call}
    assert set(timer.calls.values()) == {3} and len(timer.calls) == 4       # attn1 and attn2 of 2 blocks, 3 steps
    seconds = timer.seconds()
    assert seconds["self"] > 0 and seconds["cross"] > 0

    pipe(**kwargs)                                                          # hooks are gone after the with block
    assert set(timer.calls.values()) == {3} and timer.seconds() == seconds
