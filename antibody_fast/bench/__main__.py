"""``python -m antibody_fast.bench [options]``: see :func:`antibody_fast.bench.runner.main`."""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
