"""Deprecated: moved to :mod:`dit_sparse.eval.bench.compile_kernels` (``python -m dit_sparse.eval.bench.compile_kernels``)."""

from ._moved import moved

moved(__spec__.name, __name__ == "__main__")
