"""Deprecated: moved to :mod:`dit_sparse.eval.studies.families` (``python -m dit_sparse.eval.studies.families``)."""

from ._moved import moved

moved(__spec__.name, __name__ == "__main__")
