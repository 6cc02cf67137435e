"""Deprecated: moved to :mod:`dit_sparse.eval.bench.planner` (``python -m dit_sparse.eval.bench.planner``)."""

from ._moved import moved

moved(__spec__.name, __name__ == "__main__")
