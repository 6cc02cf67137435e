"""Deprecated: moved to :mod:`dit_sparse.eval.studies.budgets` (``python -m dit_sparse.eval.studies.budgets``)."""

from ._moved import moved

moved(__spec__.name, __name__ == "__main__")
