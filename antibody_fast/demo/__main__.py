"""``python -m antibody_fast.demo [options]``: see :func:`antibody_fast.demo.cli.main`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
