"""Integrations: HF Trainer subclasses, the fused-loss hook for stock trainers, PEFT helpers.

Names load lazily: importing ``antibody_fast.integrations`` imports neither transformers nor peft.

* :func:`use_fused_loss` / :func:`remove_fused_loss` (:mod:`.fused_loss`): a stock HF ``Trainer`` computes its
  causal-LM loss with the fused linear log-likelihood (no logits); under TRL's trainers, which install their own
  fused head, it raises :class:`FusedLossBypassedError` instead of being skipped in silence.
* :func:`use_fused_head` (:mod:`.trl_head`, needs TRL): TRL's own fused-head slot (``fused_lm_head=True``)
  computes with our op (per-token log-probs, entropy, top-1 flags).
* :class:`AntibodySFTTrainer` / :class:`AntibodyAlignmentSFTTrainer` (:mod:`.trl`, needs TRL): ``trl.SFTTrainer``
  subclasses whose update is :func:`antibody_fast.weighted_step` / :func:`antibody_fast.align_step`, on TRL's
  prompt-completion and conversational formats.
* :class:`AntibodyAlignmentTrainer`, :class:`AntibodyFinetuneTrainer` (:mod:`.hf`): ``transformers.Trainer``
  subclasses whose update is :func:`antibody_fast.align_step` / :func:`antibody_fast.weighted_step`;
  :class:`BoosterTrainer` = the alignment trainer with ``rule="constant", lambda_ref=0``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "use_fused_loss": "antibody_fast.integrations.fused_loss",
    "remove_fused_loss": "antibody_fast.integrations.fused_loss",
    "fused_causal_lm_loss": "antibody_fast.integrations.fused_loss",
    "FusedLossHandle": "antibody_fast.integrations.fused_loss",
    "AntibodyAlignmentTrainer": "antibody_fast.integrations.hf",
    "AntibodyFinetuneTrainer": "antibody_fast.integrations.hf",
    "BoosterTrainer": "antibody_fast.integrations.hf",
    "FusedLossBypassedError": "antibody_fast.integrations.fused_loss",
    "AntibodySFTTrainer": "antibody_fast.integrations.trl",
    "AntibodyAlignmentSFTTrainer": "antibody_fast.integrations.trl",
    "use_fused_head": "antibody_fast.integrations.trl_head",
    "remove_fused_head": "antibody_fast.integrations.trl_head",
    "FusedHeadHandle": "antibody_fast.integrations.trl_head",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'antibody_fast.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
