"""The baseline defenses, Vaccine and Lisa: public import path of :mod:`antibody_fast.steps.baselines`.

They are steps like :func:`~antibody_fast.steps.weighted_step` and live beside them (docs/design.md §2.3, §7).
"""

from .steps.baselines import *  # noqa: F403
from .steps.baselines import __all__  # noqa: F401  (the same public names)
