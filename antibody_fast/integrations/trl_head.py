"""Our fused lm_head in TRL's fused-head slot: :func:`use_fused_head`.

TRL (1.x) installs its own fused LM head when a trainer is built (``trl.trainer.utils.add_fused_lm_head``: SFT,
DPO, KTO, GRPO, RLOO). The trainer then calls the model with ``fused_lm_head=True`` and reads a
``FusedCausalLMOutput``: the loss, the per-token ``log_probs`` and, as asked by the trainer (``outputs``),
``entropy`` and ``is_top1`` (SFT logs ``entropy`` and ``mean_token_accuracy`` from them).

``use_fused_head(trainer)`` replaces that head's computation with :func:`antibody_fast.ops.sequence_logprob.
linear_token_logprob` (torch / C++ / Triton, same pass for all three outputs). Everything else in TRL's
forward is kept: the backbone call (``use_cache=False``), the shift (or pre-shifted ``shift_labels``), the loss
``-sum(log_probs) / num_items_in_batch`` (or the scored-token count), ``label_mask``, and calls without
``fused_lm_head`` (generation) go to TRL's forward unchanged.

Supported: the outputs ``log_probs``, ``entropy``, ``is_top1`` (``entropy`` and ``is_top1`` carry no gradient:
SFT uses them as metrics; a trainer that differentiates the entropy must keep TRL's head); ``temperature``
(hidden states divided by it, so without a soft-cap or bias only); ``cast_lm_head_to_fp32``. Refused with a
clear error when the trainer is built: other outputs (``log_sum_sq_probs``, ``mean_logits``), MoE router losses,
logit scaling, adapters on the lm_head. Under FSDP2 the weight is gathered (``full_tensor``, in
:func:`antibody_fast._model.head_args`) as TRL does.

No silent bypass: the handle counts the calls our op served (``handle.calls``) and, given a trainer, a callback
raises after the first optimizer step if that count is still 0.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from .._model import get_trunk_and_head, head_args, last_hidden, unwrap_ddp, unwrap_peft
from .fused_loss import bypass_guard, is_foreign_fused_head, is_trainer

__all__ = ["use_fused_head", "remove_fused_head", "FusedHeadHandle", "SUPPORTED_OUTPUTS"]

SUPPORTED_OUTPUTS = ("log_probs", "entropy", "is_top1")
_ATTR = "_antibody_fast_fused_head"


class FusedHeadHandle:
    """Returned by :func:`use_fused_head`: ``calls`` (fused calls our op served), ``outputs`` and
    ``temperature`` (read from TRL's head), ``remove()`` (restores TRL's head)."""

    def __init__(self, target, trl_forward, outputs, temperature, impl):
        self.target, self.trl_forward = target, trl_forward
        self.outputs, self.temperature, self.impl = outputs, temperature, impl
        self.calls = 0

    def remove(self) -> None:
        remove_fused_head(self.target)


def _trl_settings(forward) -> dict:
    """The settings TRL's ``add_fused_lm_head`` closed over (``outputs``, ``temperature``, ...)."""
    fn = getattr(forward, "__func__", forward)
    try:
        return dict(inspect.getclosurevars(fn).nonlocals)
    except (TypeError, ValueError):  # pragma: no cover - not a Python function
        return {}


def use_fused_head(trainer_or_model, *, impl: str = "auto") -> FusedHeadHandle:
    """Make TRL's ``fused_lm_head=True`` path compute with antibody_fast's fused op.

    Args:
        trainer_or_model: a built TRL trainer (its model carries TRL's head; a guard callback is added), or
            the model after TRL patched it (PEFT- / DDP-wrapped or not).
        impl: ``"auto" | "triton" | "cpp" | "torch"``.

    Returns:
        :class:`FusedHeadHandle`. Idempotent: a second call returns the existing handle.

    Raises:
        ValueError: the model has no TRL fused head yet (call this after building the trainer), or TRL asks for
            outputs / settings this op does not compute (see the module docstring).
        TypeError: no plain linear lm_head, or logits rescaled (:func:`antibody_fast.models.get_trunk_and_head`).
    """
    from ..dispatch import IMPLS

    if impl not in IMPLS:
        raise ValueError(f"use_fused_head: impl must be one of {IMPLS}, got {impl!r}")
    if is_trainer(trainer_or_model):
        installed = getattr(unwrap_peft(unwrap_ddp(trainer_or_model.model)), _ATTR, None)
        handle = use_fused_head(trainer_or_model.model, impl=impl)
        if handle is installed:  # a second call: the guard is in place already
            return handle
        trainer_or_model.add_callback(
            bypass_guard(
                handle,
                _ATTR,
                "use_fused_head: an optimizer step finished but antibody_fast's head never ran: the trainer did not "
                "call the model with fused_lm_head=True. Use TRL's own head for this trainer.",
            )
        )
        return handle
    target = unwrap_peft(unwrap_ddp(trainer_or_model))
    existing = getattr(target, _ATTR, None)
    if existing is not None:
        return existing
    trl_forward = target.forward
    if not is_foreign_fused_head(trl_forward):
        raise ValueError(
            "use_fused_head: the model carries no TRL fused LM head; call use_fused_head(trainer) after building "
            "the TRL trainer (it installs its head then). For a plain transformers.Trainer use use_fused_loss."
        )
    trunk, lm_head, softcap = get_trunk_and_head(target)
    cfg = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    if getattr(cfg, "output_router_logits", False):
        raise ValueError(
            "use_fused_head: MoE router losses are not supported; keep TRL's head for this model"
        )
    s = _trl_settings(trl_forward)
    outputs = tuple(s.get("outputs", ("log_probs",)))
    unknown = [o for o in outputs if o not in SUPPORTED_OUTPUTS]
    if unknown:
        raise ValueError(
            f"use_fused_head: TRL asks for {unknown}, which antibody_fast's head does not compute (it computes "
            f"{', '.join(SUPPORTED_OUTPUTS)}); keep TRL's head for this trainer"
        )
    temperature = float(s.get("temperature", 1.0))
    if temperature != 1.0 and (softcap is not None or lm_head.bias is not None):
        raise ValueError(
            "use_fused_head: a temperature != 1 with a soft-cap or an lm_head bias is not supported"
        )
    cast_fp32 = bool(s.get("cast_lm_head_to_fp32", False))
    stats = "entropy" in outputs or "is_top1" in outputs
    from trl.trainer.utils import FusedCausalLMOutput

    from ..ops.sequence_logprob import linear_token_logprob

    @functools.wraps(type(target).forward)  # generate() checks its kwargs against this signature
    def forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw
    ):
        if not fused_lm_head:
            return trl_forward(
                *args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kw
            )
        if labels is None and shift_labels is None:
            raise ValueError(
                "use_fused_head: fused_lm_head=True needs labels or shift_labels (as TRL passes them)"
            )
        kw["use_cache"] = False
        hidden = last_hidden(trunk(*args, **kw))
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        # the matmul's dtype, as TRL's head: float32 when asked, else the autocast dtype when autocast is on
        dev = hidden.device.type
        dt = lm_head.weight.dtype
        if cast_fp32:
            dt = torch.float32
        elif torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
        weight, bias = head_args(lm_head, dt)  # gathers an FSDP2-sharded weight
        hidden, labels = hidden.to(weight.device, dt), labels.to(weight.device)
        if temperature != 1.0:
            hidden = hidden / temperature
        out = linear_token_logprob(
            hidden, weight, labels, bias=bias, softcap=softcap, shift=False, stats=stats, impl=impl
        )
        handle.calls += 1
        mask = out.mask
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -out.log_probs.sum() / denom
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=out.log_probs,
            entropy=out.entropy if "entropy" in outputs else None,
            is_top1=out.is_top1 if "is_top1" in outputs else None,
            label_mask=mask,
        )

    handle = FusedHeadHandle(target, trl_forward, outputs, temperature, impl)
    target.forward = types.MethodType(forward, target)
    setattr(target, _ATTR, handle)
    return handle


def remove_fused_head(model) -> bool:
    """Undo :func:`use_fused_head` (TRL's own head computes again); False when it was not installed."""
    target = unwrap_peft(unwrap_ddp(model))
    handle = getattr(target, _ATTR, None)
    if handle is None:
        return False
    target.forward = handle.trl_forward
    delattr(target, _ATTR)
    return True
