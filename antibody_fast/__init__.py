"""antibody_fast: fused kernels and a lean training loop for the Antibody defense.

Importing the package is cheap: it initialises no CUDA and imports neither transformers, peft nor
datasets. Public names load lazily on first access.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # ops
    "SeqLogprob": "antibody_fast.ops.sequence_logprob",
    "sequence_logprob": "antibody_fast.ops.sequence_logprob",
    "linear_sequence_logprob": "antibody_fast.ops.sequence_logprob",
    "paired_sequence_logprob": "antibody_fast.ops.sequence_logprob",
    "linear_token_logprob": "antibody_fast.ops.sequence_logprob",
    "TokenLogprob": "antibody_fast.ops.sequence_logprob",
    "sq_norm": "antibody_fast.ops.flat_ops",
    "perturb_": "antibody_fast.ops.flat_ops",
    "grad_dots": "antibody_fast.ops.flat_ops",
    "antibody_combine_": "antibody_fast.ops.flat_ops",
    "clip_": "antibody_fast.ops.flat_ops",
    "restore_": "antibody_fast.ops.flat_ops",
    "PerturbBackup": "antibody_fast.ops.flat_ops",
    # flat parameters
    "FlatParameters": "antibody_fast.flat",
    # training steps
    "weighted_step": "antibody_fast.steps.finetune",
    "align_step": "antibody_fast.steps.align",
    "sft_step": "antibody_fast.steps.finetune",
    "FinetuneConfig": "antibody_fast.steps.config",
    "AlignConfig": "antibody_fast.steps.config",
    "AlignState": "antibody_fast.steps.config",
    "StepStats": "antibody_fast.steps.config",
    "NonFiniteError": "antibody_fast.guard",
    "save_checkpoint": "antibody_fast.checkpoint",
    "load_checkpoint": "antibody_fast.checkpoint",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'antibody_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
