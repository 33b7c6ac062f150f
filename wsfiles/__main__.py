"""``python -m wsfiles``: the same as the ``wsfiles`` console script."""

import sys

from wsfiles.cli import main

sys.exit(main())
