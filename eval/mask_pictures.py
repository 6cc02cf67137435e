"""Deprecated: moved to :mod:`dit_sparse.eval.studies.mask_pictures` (``python -m dit_sparse.eval.studies.mask_pictures``)."""

from ._moved import moved

moved(__spec__.name, __name__ == "__main__")
