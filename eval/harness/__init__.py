"""The generation harness the eval and the demo share: loading a model (:mod:`.models`, the tiny
offline Wan of :mod:`.offline_model`), generation settings and video sizes, timed dense and sparse
generations (:mod:`.runner`) with the time in attention (:mod:`.attention_timer`), and what a sparse
run did (:mod:`.sparse_stats`)."""
