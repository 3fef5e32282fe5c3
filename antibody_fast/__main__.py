"""``python -m antibody_fast``: the ``antibody-fast`` command line (see :mod:`antibody_fast.cli`)."""

from .cli import console_main

console_main()
