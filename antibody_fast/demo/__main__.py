"""``python -m antibody_fast.demo [options]``: see :func:`antibody_fast.demo.main`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
