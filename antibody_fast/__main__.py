"""``python -m antibody_fast``: the ``antibody-fast`` command line (see :mod:`antibody_fast.cli`)."""

import sys

from .cli import main

sys.exit(main())
