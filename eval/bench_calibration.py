"""Deprecated: moved to :mod:`dit_sparse.eval.bench.calibration` (``python -m dit_sparse.eval.bench.calibration``)."""

from ._moved import moved

moved(__spec__.name, __name__ == "__main__")
