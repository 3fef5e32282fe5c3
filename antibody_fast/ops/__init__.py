"""Ops. One package per op (or family of ops), every one with the same files (CONTRIBUTING.md "Adding an op"):
``__init__.py`` (public API), ``_validate.py`` (input checks), ``_torch.py`` (the pure-torch twin, the params
dataclasses and the references), ``_triton.py`` (launchers of ``kernels/<op>.py``), ``_cpp.py`` (binding to
``csrc/<op>.cpp``) and ``_register.py`` (dispatch entry, ``torch.library`` custom ops, fakes, autograd; one
:func:`~antibody_fast.ops._registry.define_op` each). Shared by the op packages: ``_registry.py`` (``define_op``)
and ``_dtypes.py`` (``acc_dtype``, the accumulation dtype of the torch twins and the fake kernels).

Importing this package registers every op with :mod:`antibody_fast.dispatch` and ``torch.library``; it does not
import triton.
"""

from .flat_ops import antibody_combine_, clip_, grad_dots, perturb_, restore_, sq_norm
from .sequence_logprob import (
    SeqLogprob,
    TokenLogprob,
    linear_sequence_logprob,
    linear_token_logprob,
    paired_sequence_logprob,
    sequence_logprob,
)

__all__ = [
    "SeqLogprob",
    "sequence_logprob",
    "linear_sequence_logprob",
    "paired_sequence_logprob",
    "TokenLogprob",
    "linear_token_logprob",
    "sq_norm",
    "perturb_",
    "restore_",
    "grad_dots",
    "antibody_combine_",
    "clip_",
]
