"""``python -m dit_sparse.app``: the same as ``dit-sparse-demo`` (see :mod:`dit_sparse.app.cli`)."""

import sys

from .cli import main

sys.exit(main())
