"""Studies, each a command that writes its results and figures under ``--out``.

On synthetic attention (default ``--out docs``; see docs/studies.md):
``python -m dit_sparse.eval.studies.families``, ``.budgets``, ``.peers`` and ``.mask_pictures``.
On the trained reference model (see docs/fidelity.md): ``python -m dit_sparse.eval.studies.fidelity``."""
