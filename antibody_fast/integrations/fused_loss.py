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

**No silent bypass.** A trainer may replace the model's forward after the hook is installed, and then our op
never runs. TRL (1.x) does exactly that: ``SFTTrainer`` (and DPO, KTO, GRPO, RLOO) installs its own fused LM head
(``trl.trainer.utils.add_fused_lm_head``) and calls the model with ``fused_lm_head=True``. The hook therefore:

* refuses to install on a model whose forward is already such a fused head (:class:`FusedLossBypassedError`);
* checks every call of the model it was given (a forward pre-hook, a dict lookup, no tensor work) and raises
  :class:`FusedLossBypassedError` on the first call that asks for another fused head (``fused_lm_head=True``),
  before any forward or optimizer step ran;
* counts the calls its fused path served (``handle.calls``, a host int), and ``use_fused_loss(trainer)`` adds a
  callback that raises after the first optimizer step if that count is still 0, whatever the cause.

Under TRL, serve TRL's fused-head slot instead: :func:`antibody_fast.integrations.trl.use_fused_head` (after the
trainer is built) makes TRL's ``fused_lm_head=True`` path compute with our op.

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

from .._model import get_trunk_and_head, head_args, last_hidden, output_cache, unwrap_ddp, unwrap_peft

__all__ = [
    "use_fused_loss",
    "remove_fused_loss",
    "fused_causal_lm_loss",
    "FusedLossHandle",
    "FusedLossBypassedError",
]

_ATTR = "_antibody_fast_fused_loss"

_BYPASS_HELP = (
    "TRL's trainers (SFTTrainer, DPOTrainer, ... since TRL 1.0) install their own fused LM head "
    "(trl.trainer.utils.add_fused_lm_head) and call the model with fused_lm_head=True, which bypasses "
    "antibody_fast's fused loss. Under TRL, drop use_fused_loss and call "
    "antibody_fast.integrations.trl.use_fused_head(trainer) after building the trainer (our op in TRL's slot), "
    "or train with a plain transformers.Trainer, where use_fused_loss works."
)


class FusedLossBypassedError(RuntimeError):
    """The fused-loss hook is installed but the trainer computes its loss another way (see the module doc)."""


class FusedLossHandle:
    """Returned by :func:`use_fused_loss`; ``remove()`` restores the original forward.

    Attributes:
        calls: number of forward calls the fused path served (a host int; no device sync).
    """

    def __init__(self, target: torch.nn.Module, original, had_instance_forward: bool, impl: str):
        self.target = target
        self.original = original
        self.had_instance_forward = had_instance_forward
        self.impl = impl
        self.calls = 0
        self.hooks: list = []

    def remove(self) -> None:
        remove_fused_loss(self.target)

    def __enter__(self) -> FusedLossHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


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
    w, b = head_args(lm_head, hidden.dtype)  # autocast: HF's lm_head runs in the dtype hidden already has
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


def is_foreign_fused_head(forward) -> bool:
    """Whether ``forward`` is another library's fused-LM-head forward (TRL's takes ``fused_lm_head=``)."""
    fn = getattr(forward, "__func__", forward)
    code = getattr(fn, "__code__", None)
    return (
        code is not None and "fused_lm_head" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    )


def is_trainer(obj) -> bool:
    return hasattr(obj, "add_callback") and hasattr(obj, "model") and hasattr(obj, "args")


def bypass_guard(handle, attr: str, message: str):
    """A ``TrainerCallback`` that raises :class:`FusedLossBypassedError` (``message``) after an optimizer step if
    ``handle.calls`` is still 0 while ``handle`` is installed (``getattr(handle.target, attr) is handle``)."""
    from transformers import TrainerCallback

    class FusedPathGuard(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if handle.calls == 0 and getattr(handle.target, attr, None) is handle:
                raise FusedLossBypassedError(message)

    return FusedPathGuard()


def use_fused_loss(model, *, impl: str = "auto") -> FusedLossHandle:
    """Patch ``model`` (an HF causal LM, PEFT- or DDP-wrapped or not) so that calls with ``labels`` compute
    the loss with the fused linear log-likelihood and return ``logits=None``. Idempotent (a second call
    returns a handle on the existing patch). See the module docstring.

    Args:
        model: the model handed to the trainer, or the trainer itself (then ``trainer.model`` is patched and a
            callback checks, after the first optimizer step, that the fused path ran).
        impl: implementation of the fused op (``"auto"|"triton"|"cpp"|"torch"``).

    Returns:
        :class:`FusedLossHandle` (``remove()`` undoes the patch; usable as a context manager).

    Raises:
        TypeError: the model has no plain linear lm_head or rescales its logits (see
            :func:`antibody_fast.models.get_trunk_and_head`).
        FusedLossBypassedError: the model already carries another fused LM head (TRL's), which would bypass ours;
            later, on the first call that asks for another fused head.
    """
    from ..dispatch import IMPLS

    if impl not in IMPLS:
        raise ValueError(f"use_fused_loss: impl must be one of {IMPLS}, got {impl!r}")
    if is_trainer(model):
        handle = use_fused_loss(model.model, impl=impl)
        model.add_callback(
            bypass_guard(
                handle,
                _ATTR,
                "use_fused_loss: an optimizer step finished but antibody_fast's fused loss never ran: the trainer "
                "computes its loss another way. " + _BYPASS_HELP,
            )
        )
        return handle
    inner = unwrap_ddp(model)
    target = unwrap_peft(inner)
    existing = getattr(target, _ATTR, None)
    if existing is not None:
        return existing
    trunk, lm_head, softcap = get_trunk_and_head(target)  # raises TypeError for unsupported models
    if is_foreign_fused_head(target.forward):
        raise FusedLossBypassedError(
            "use_fused_loss: this model already carries another fused LM head. " + _BYPASS_HELP
        )
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
        if kwargs.get("fused_lm_head"):
            raise FusedLossBypassedError(
                "use_fused_loss: the model was called with fused_lm_head=True. " + _BYPASS_HELP
            )
        if args or (labels is None and shift_labels is None) or kwargs.get("return_dict") is False:
            return original(*args, **kwargs)
        handle.calls += 1
        return _fused_forward(trunk, lm_head, softcap, impl, kwargs)

    def pre_hook(module, args, kwargs):
        # The trainer calls the outer module; TRL's replacement forward never reaches ours, so check here.
        if kwargs.get("fused_lm_head"):
            raise FusedLossBypassedError(
                "use_fused_loss: the model was called with fused_lm_head=True: another fused LM head computes "
                "the loss. " + _BYPASS_HELP
            )

    target.forward = forward
    handle = FusedLossHandle(target, original, had_instance_forward, impl)
    for m in {id(model): model, id(inner): inner, id(target): target}.values():
        handle.hooks.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
    setattr(target, _ATTR, handle)
    return handle


def remove_fused_loss(model: torch.nn.Module) -> bool:
    """Undo :func:`use_fused_loss` on ``model``; returns False when it was not patched."""
    target = unwrap_peft(unwrap_ddp(model))
    handle = getattr(target, _ATTR, None)
    if handle is None:
        return False
    for h in handle.hooks:
        h.remove()
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
    hidden = last_hidden(out)
    loss, _ = fused_causal_lm_loss(
        hidden,
        lm_head,
        labels if shift_labels is None else None,
        shift_labels=shift_labels,
        num_items_in_batch=num_items,
        softcap=softcap,
        impl=impl,
    )
    # the cache under the output class's own field name (``cache`` in newer transformers)
    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    cache_field = "cache" if "cache" in fields else "past_key_values"
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
        **{cache_field: output_cache(out)},
    )
