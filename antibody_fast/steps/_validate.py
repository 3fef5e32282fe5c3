"""Checks the steps run before any state change: configs, batches, refusals (docs/reliability.md).

Shared by :mod:`.config`, :mod:`.finetune`, :mod:`.align` and :mod:`.baselines`. Every check
raises ``ValueError`` / ``TypeError`` and modifies nothing.
"""

from __future__ import annotations

import math

import torch

from ..data.batch import IGNORE_INDEX, FinetuneBatch, LMBatch

__all__ = [
    "as_batches",
    "check_amp",
    "check_guard",
    "check_lm_batch",
    "check_max_norm",
    "check_refusal",
    "checked_config",
    "do_validate",
    "same_device",
]


# ------------------------------------------------------------------------------------------------ configs
def checked_config(config, cls: type, owner: str | None):
    """``config`` (``cls()`` when None), type-checked and validated; raises before anything is modified.
    ``owner`` (the step's name, or None) prefixes the type error."""
    config = cls() if config is None else config
    if not isinstance(config, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        prefix = f"{owner}: " if owner else ""
        raise TypeError(f"{prefix}config must be {article} {cls.__name__}, got {type(config).__name__}")
    config.validate()
    return config


def check_max_norm(v, owner: str) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise ValueError(f"{owner}.max_grad_norm must be None or a finite number > 0, got {v!r}")


def check_guard(cfg, owner: str | None) -> None:
    """The non-finite guard options ``guard_nonfinite`` / ``max_consecutive_skips`` of any step config;
    ``owner`` (the config's class name, or None) prefixes the option's name in the message."""
    prefix = f"{owner}." if owner else ""
    if not isinstance(cfg.guard_nonfinite, bool):
        raise ValueError(f"{prefix}guard_nonfinite must be a bool, got {cfg.guard_nonfinite!r}")
    m = cfg.max_consecutive_skips
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"{prefix}max_consecutive_skips must be None or an int >= 1, got {m!r}")


def check_amp(v, owner: str) -> None:
    if v is not None and v not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{owner}.amp_dtype must be None, torch.bfloat16 or torch.float16, got {v!r}")


# ------------------------------------------------------------------------------------------------ batches
def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    ia = a.index if a.index is not None else torch.cuda.current_device()
    ib = b.index if b.index is not None else torch.cuda.current_device()
    return ia == ib


def do_validate(validate: bool | None, t: torch.Tensor) -> bool:
    """Whether to run the data checks that read values: ``validate``, or (None) when ``t`` is on the CPU."""
    return t.device.type == "cpu" if validate is None else bool(validate)


def as_batches(batch, name: str) -> list:
    """A micro-batch list (gradient accumulation) or one batch, as a non-empty list."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError(f"{name}: empty list of micro-batches")
        return list(batch)
    return [batch]


def check_lm_batch(batch, device: torch.device, name: str, validate: bool | None) -> None:
    if not isinstance(batch, LMBatch):
        raise TypeError(f"{name}: expected an antibody_fast.data.LMBatch, got {type(batch).__name__}")
    ids = batch.input_ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"{name}: input_ids must be a [B, T] tensor")
    b, t = ids.shape
    if b == 0:
        raise ValueError(f"{name}: empty batch (0 samples)")
    p = batch.prompt_len
    if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p:
        raise ValueError(f"{name}: prompt_len must be a python int >= 1, got {p!r}")
    if t <= p:
        raise ValueError(
            f"{name}: no answer columns (sequence length {t} <= prompt_len {p}); every response was truncated "
            "to zero tokens"
        )
    for field_name in ("attention_mask", "position_ids", "labels"):
        x = getattr(batch, field_name)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (b, t):
            raise ValueError(
                f"{name}: {field_name} must have the shape of input_ids {(b, t)}, got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
    if not isinstance(batch.prompt_lengths, torch.Tensor) or tuple(batch.prompt_lengths.shape) != (b,):
        raise ValueError(f"{name}: prompt_lengths must be a [B] tensor")
    for field_name in ("input_ids", "attention_mask", "position_ids", "labels", "prompt_lengths"):
        x = getattr(batch, field_name)
        if not same_device(x.device, device):
            raise ValueError(
                f"{name}: {field_name} is on {x.device} but the model's trainable parameters are on {device}; "
                f"move the batch with batch.to({str(device)!r})"
            )
    if do_validate(validate, ids):
        n = batch.num_answer_tokens
        if bool((n == 0).any()):
            bad = torch.nonzero(n == 0).flatten().tolist()
            raise ValueError(
                f"{name}: samples {bad[:10]} have zero answer tokens (response truncated to nothing); "
                "drop them or raise max_length"
            )
        if bool((batch.labels[:, :p] != IGNORE_INDEX).any()):
            raise ValueError(f"{name}: labels on prompt columns (< prompt_len={p}) must be {IGNORE_INDEX}")


def check_refusal(batch, device: torch.device, name: str, validate: bool | None) -> None:
    if not isinstance(batch, FinetuneBatch) or getattr(batch, "refusal_ids", None) is None:
        raise ValueError(
            f"{name}: missing refusal: weighted_step needs a FinetuneBatch with refusal_ids / refusal_mask / "
            "refusal_labels (use antibody_fast.data.FinetuneCollator)"
        )
    b = batch.input_ids.shape[0]
    for field_name in ("refusal_ids", "refusal_mask", "refusal_labels"):
        x = getattr(batch, field_name)
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != b:
            raise ValueError(f"{name}: {field_name} must be a [B, Tr] tensor with B={b}")
        if x.shape != batch.refusal_ids.shape:
            raise ValueError(f"{name}: {field_name} must have the shape of refusal_ids")
        if not same_device(x.device, device):
            raise ValueError(f"{name}: {field_name} is on {x.device} but the model is on {device}")
    if batch.refusal_ids.shape[1] == 0:
        raise ValueError(f"{name}: missing refusal: refusal_ids has zero columns")
    if do_validate(validate, batch.refusal_ids):
        n = batch.num_refusal_tokens
        if bool((n == 0).any()):
            bad = torch.nonzero(n == 0).flatten().tolist()
            raise ValueError(f"{name}: samples {bad[:10]} have an empty refusal (zero refusal tokens)")
