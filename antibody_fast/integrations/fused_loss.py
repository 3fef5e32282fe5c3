"""Kernel-only integration: make a stock HF ``Trainer`` / TRL ``SFTTrainer`` compute its causal-LM loss with
:func:`antibody_fast.ops.linear_sequence_logprob` instead of materialised logits.

::

    from antibody_fast.integrations import use_fused_loss

    model = AutoModelForCausalLM.from_pretrained(...)      # or a PEFT-wrapped model
    use_fused_loss(model)                                   # patches the forward of the underlying HF model
    Trainer(model=model, ...).train()                       # unchanged training code

When the model is called **with labels** (what every trainer does), the patched forward runs the decoder
trunk, then the fused linear log-likelihood over the (shifted) labels, and returns a ``CausalLMOutputWithPast``
with::

    loss   = -sum_i logp(label_i) / num_items_in_batch     (HF Trainer passes num_items_in_batch)
           = -sum_i logp(label_i) / sum(num_tokens)        (otherwise: HF's token mean)
    logits = None                                          (never materialised)

which is exactly HF's ``ForCausalLMLoss`` (fp32 log-softmax, ``ignore_index=-100``, labels shifted inside
the loss, or ``shift_labels`` used as given). Calls without labels (generation, evaluation of logits) run
the original forward unchanged. The hook patches the *instance* (``model.forward``) of the underlying
transformers model, so it works through PEFT wrappers (``PeftModel -> LoraModel -> model.forward``) and
DDP; :func:`remove_fused_loss` (or the returned handle's ``remove()``) restores the original forward.

Trainers that need logits for metrics (``compute_metrics`` with ``prediction_loss_only=False``) get
``None``; set ``prediction_loss_only=True`` or remove the hook for evaluation. Models whose lm_head carries
adapters or that rescale logits are rejected by :func:`antibody_fast.models.get_trunk_and_head`
(``TypeError``) when the hook is installed, not in the middle of training.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

__all__ = ["use_fused_loss", "remove_fused_loss", "fused_causal_lm_loss", "FusedLossHandle"]

_ATTR = "_antibody_fast_fused_loss"


class FusedLossHandle:
    """Returned by :func:`use_fused_loss`; ``remove()`` restores the original forward."""

    def __init__(self, target: torch.nn.Module, original, had_instance_forward: bool, impl: str):
        self.target = target
        self.original = original
        self.had_instance_forward = had_instance_forward
        self.impl = impl

    def remove(self) -> None:
        remove_fused_loss(self.target)

    def __enter__(self) -> FusedLossHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _head_args(lm_head: torch.nn.Linear, hidden: torch.Tensor):
    w = lm_head.weight
    b = lm_head.bias
    if w.dtype != hidden.dtype:
        # autocast: HF's lm_head would run in the autocast dtype; hidden already is in it
        w = w.to(hidden.dtype)
        b = None if b is None else b.to(hidden.dtype)
    return w, b


def fused_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's causal-LM loss from hidden states, without logits.

    Args:
        hidden: ``[B, T, H]`` final hidden states (fp32 / fp16 / bf16).
        lm_head: the ``nn.Linear`` output layer (``weight [V, H]``, optional ``bias [V]``).
        labels: ``[B, T]`` int64 unshifted labels (shifted here: column t predicts label t+1), or
        shift_labels: ``[B, T]`` int64 labels already aligned with ``hidden`` (used as given).
        num_items_in_batch: the loss denominator (HF Trainer's count of label tokens over the whole
            accumulated batch); ``None``: the number of non-ignored tokens of this batch.
        softcap: final logit soft-cap (Gemma-2), or ``None``.

    Returns:
        ``(loss 0-dim fp32, num_tokens 0-dim int64)``.
    """
    from ..ops.sequence_logprob import linear_sequence_logprob

    if (labels is None) == (shift_labels is None):
        raise ValueError("fused_causal_lm_loss: pass exactly one of labels / shift_labels")
    tgt = labels if shift_labels is None else shift_labels
    if tgt.shape != hidden.shape[:2]:
        raise ValueError(
            f"fused_causal_lm_loss: labels {tuple(tgt.shape)} must match hidden's [B, T] = {tuple(hidden.shape[:2])}"
        )
    w, b = _head_args(lm_head, hidden)
    out = linear_sequence_logprob(
        hidden,
        w,
        tgt.to(hidden.device),
        bias=b,
        softcap=softcap,
        ignore_index=ignore_index,
        shift=shift_labels is None,
        impl=impl,
    )
    total = -out.logprob.sum()
    n = out.num_tokens.sum()
    if num_items_in_batch is None:
        loss = total / n
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    return loss.to(torch.float32), n


def use_fused_loss(model: torch.nn.Module, *, impl: str = "auto") -> FusedLossHandle:
    """Patch ``model`` (an HF causal LM, PEFT- or DDP-wrapped or not) so that calls with ``labels`` compute
    the loss with the fused linear log-likelihood and return ``logits=None``. Idempotent (a second call
    returns a handle on the existing patch). See the module docstring.

    Args:
        model: the model handed to the trainer.
        impl: implementation of the fused op (``"auto"|"triton"|"cpp"|"torch"``).

    Returns:
        :class:`FusedLossHandle` (``remove()`` undoes the patch; usable as a context manager).

    Raises:
        TypeError: the model has no plain linear lm_head or rescales its logits (see
            :func:`antibody_fast.models.get_trunk_and_head`).
    """
    from ..dispatch import IMPLS
    from ..models import get_trunk_and_head, unwrap_peft

    if impl not in IMPLS:
        raise ValueError(f"use_fused_loss: impl must be one of {IMPLS}, got {impl!r}")
    inner = model
    while isinstance(inner, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        inner = inner.module
    target = unwrap_peft(inner)
    existing = getattr(target, _ATTR, None)
    if existing is not None:
        return existing
    trunk, lm_head, softcap = get_trunk_and_head(target)  # raises TypeError for unsupported models
    had_instance_forward = "forward" in vars(target)
    original = target.forward
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        signature = None

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if args and signature is not None:
            try:
                bound = signature.bind_partial(*args, **kwargs)
            except TypeError:
                return original(*args, **kwargs)
            extra = bound.arguments.pop("kwargs", {}) if "kwargs" in signature.parameters else {}
            kwargs = {**bound.arguments, **extra}
            args = ()
        labels = kwargs.get("labels")
        shift_labels = kwargs.get("shift_labels")
        if args or (labels is None and shift_labels is None) or kwargs.get("return_dict") is False:
            return original(*args, **kwargs)
        return _fused_forward(trunk, lm_head, softcap, impl, kwargs)

    target.forward = forward
    handle = FusedLossHandle(target, original, had_instance_forward, impl)
    setattr(target, _ATTR, handle)
    return handle


def remove_fused_loss(model: torch.nn.Module) -> bool:
    """Undo :func:`use_fused_loss` on ``model``; returns False when it was not patched."""
    from ..models import unwrap_peft

    inner = model
    while isinstance(inner, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        inner = inner.module
    target = unwrap_peft(inner)
    handle = getattr(target, _ATTR, None)
    if handle is None:
        return False
    if handle.had_instance_forward:
        target.forward = handle.original
    else:
        del target.forward
    delattr(target, _ATTR)
    return True


def _fused_forward(trunk, lm_head, softcap, impl: str, kwargs: dict[str, Any]):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs = dict(kwargs)
    labels = kwargs.pop("labels", None)
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    kwargs.pop("ignore_index", None)
    out = trunk(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    loss, _ = fused_causal_lm_loss(
        hidden,
        lm_head,
        labels if shift_labels is None else None,
        shift_labels=shift_labels,
        num_items_in_batch=num_items,
        softcap=softcap,
        impl=impl,
    )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(out, "past_key_values", None),
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )
