"""``python -m dit_sparse.eval``: the evaluation CLI (see :mod:`dit_sparse.eval.cli`)."""

import sys

from .cli import main

sys.exit(main())
