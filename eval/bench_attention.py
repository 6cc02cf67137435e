"""Deprecated: moved to :mod:`dit_sparse.eval.bench.attention` (``python -m dit_sparse.eval.bench.attention``)."""

from ._moved import moved

moved(__spec__.name, __name__ == "__main__")
