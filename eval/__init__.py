"""Evaluation: speed and fidelity of sparse attention against dense. Installed as ``dit_sparse.eval``.

- the eval command (``python -m dit_sparse.eval``, :mod:`.cli`): :mod:`.evaluation` runs it,
  :mod:`.results`, :mod:`.report`, :mod:`.plots`, :mod:`.videos`, :mod:`.metrics`,
  :mod:`.vbench_bridge` and :mod:`.machine` make its outputs;
- :mod:`.harness`: loading a model and timing dense and sparse generations (the eval's and the demo's);
- :mod:`.bench`: micro-benchmarks; :mod:`.studies`: studies of the mask families, both on the
  synthetic attention of :mod:`.synthetic`;
- :mod:`.reference`: the project's trained reference model.
"""
