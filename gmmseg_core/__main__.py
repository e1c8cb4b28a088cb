"""``python -m gmmseg_core`` runs the ``gmmseg`` command (see :mod:`gmmseg_core.cli`)."""

import sys

from gmmseg_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
