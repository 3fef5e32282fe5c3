"""``python -m antibody_fast``: the ``antibody-fast`` command line (see antibody_fast/cli.py)."""

import sys

from .cli import main

sys.exit(main())
