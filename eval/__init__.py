"""Evaluation and benchmarks: speed and fidelity against dense attention. Installed as ``dit_sparse.eval``."""
