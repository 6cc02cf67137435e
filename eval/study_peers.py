"""Deprecated: moved to :mod:`dit_sparse.eval.studies.peers` (``python -m dit_sparse.eval.studies.peers``)."""

from ._moved import moved

moved(__spec__.name, __name__ == "__main__")
