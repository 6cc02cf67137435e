"""Studies of the mask families on synthetic attention, each a command that writes its results and
figure under ``--out`` (default ``docs``): ``python -m dit_sparse.eval.studies.families``,
``.budgets``, ``.peers`` and ``.mask_pictures``. See docs/studies.md."""
