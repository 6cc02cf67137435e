"""Micro-benchmarks, each a command: ``python -m dit_sparse.eval.bench.attention`` (the attention op,
dense against every sparse backend), ``.calibration`` (block-mass measurement and planning, with peak
memory), ``.planner`` (calibration + planning per pattern), ``.pipeline`` (a full-size Wan with random
weights, dense against the library default, end to end) and ``.compile_kernels`` (compile every
Triton kernel configuration ahead of time). See docs/benchmarks.md."""
