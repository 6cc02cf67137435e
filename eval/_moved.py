"""Old command paths that moved when eval/ was split by job: each still runs, with a
``DeprecationWarning`` naming the new path.

Example::

    >>> import sys, warnings
    >>> _ = sys.modules.pop("dit_sparse.eval.bench_planner", None)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     import dit_sparse.eval.bench_planner as old
    >>> old.__name__, caught[0].category.__name__
    ('dit_sparse.eval.bench.planner', 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import runpy
import sys
import warnings

MOVED = {
    "dit_sparse.eval.bench_attention": "dit_sparse.eval.bench.attention",
    "dit_sparse.eval.bench_calibration": "dit_sparse.eval.bench.calibration",
    "dit_sparse.eval.bench_planner": "dit_sparse.eval.bench.planner",
    "dit_sparse.eval.compile_kernels": "dit_sparse.eval.bench.compile_kernels",
    "dit_sparse.eval.study_families": "dit_sparse.eval.studies.families",
    "dit_sparse.eval.study_budgets": "dit_sparse.eval.studies.budgets",
    "dit_sparse.eval.study_peers": "dit_sparse.eval.studies.peers",
    "dit_sparse.eval.mask_pictures": "dit_sparse.eval.studies.mask_pictures",
}


def moved(old: str, run_as_main: bool) -> None:
    """Stand in for ``old``: warn, then run its new module as ``__main__`` (``python -m old``) or
    make ``import old`` give the new module."""
    new = MOVED[old]
    warnings.warn(f"{old} moved to {new}: use python -m {new} (the old name will be removed)",
                  DeprecationWarning, stacklevel=2)  # the old module: __main__ under -m, shown
    if run_as_main:
        runpy.run_module(new, run_name="__main__", alter_sys=True)
    else:
        sys.modules[old] = importlib.import_module(new)
