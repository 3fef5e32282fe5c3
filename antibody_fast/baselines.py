"""The baseline defenses, Vaccine and Lisa: public import path of :mod:`antibody_fast.steps.baselines`.

They are steps like :func:`~antibody_fast.steps.weighted_step` and live beside them (docs/design.md §2.3, §7).
"""

from .steps.baselines import (
    LisaConfig,
    LisaState,
    VaccineConfig,
    find_attention_modules,
    lisa_step,
    reference_lisa_step,
    reference_vaccine_step,
    vaccine_step,
)

__all__ = [
    "LisaConfig",
    "LisaState",
    "VaccineConfig",
    "find_attention_modules",
    "lisa_step",
    "reference_lisa_step",
    "reference_vaccine_step",
    "vaccine_step",
]
