"""Building blocks of every step (the main steps and :mod:`.baselines`): the token-mean loss
through the fused linear log-likelihood, the gradient all-reduce, and the guarded finish (clip, optimizer and
scheduler step, zeroing). docs/design.md §3.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._model import (
    Parts,
    cache_argument,
    flat_parameters,
    head_args,
    last_hidden,
    model_device,
    output_cache,
    parts,
    unwrap_ddp,
)
from ..data.batch import LMBatch
from ..distributed import all_reduce_sum, is_distributed

__all__ = [
    "answer_rows",
    "autocast",
    "finish",
    "global_loss_value",
    "prepare",
    "reduce_grads",
    "start_guard",
    "token_mean_loss",
    "trunk_forward",
]


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` in ``amp_dtype`` on ``device``'s type, or disabled (``None``)."""
    if amp_dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def trunk_forward(parts: Parts, input_ids, attention_mask, position_ids, *, use_cache: bool, past=None):
    """The decoder trunk's ``(hidden [B, T, H], key/value cache or None)``.

    ``past`` is passed only when there is one, under the name the trunk's signature uses (``cache`` in newer
    transformers, ``past_key_values`` before: :func:`~antibody_fast._model.cache_argument`)."""
    if parts.fsdp_root is not None:  # FSDP2: the trunk runs inside the root's forward, so its hooks run
        from ..fsdp import root_hidden

        return root_hidden(
            parts.fsdp_root, input_ids, attention_mask, position_ids, use_cache=use_cache, past=past
        )
    kwargs = {}
    if past is not None:
        kwargs[cache_argument(parts)] = past
    out = parts.trunk(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        **kwargs,
    )
    hidden = last_hidden(out)
    cache = output_cache(out) if use_cache else None
    return hidden, cache


def answer_rows(hidden: torch.Tensor, labels: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that score the answer: hidden column t predicts label t+1, and labels before column ``p`` are
    ignored (prompt), so only columns ``p-1 .. T-2`` reach the lm_head. ``[B, T-p, H]``, ``[B, T-p]``."""
    return hidden[:, p - 1 : -1], labels[:, p:]


def prepare(model: nn.Module):
    """(inner model, parts, flat, device) with the flat grads attached and zeroed."""
    inner = unwrap_ddp(model)
    device = model_device(inner)
    p = parts(inner)
    flat = flat_parameters(inner)
    flat.zero_grad()
    return inner, p, flat, device


def reduce_grads(flat, group) -> None:
    """Sum the flat gradient buffers over ranks (no-op in one process, and under FSDP2, whose reduce-scatter
    already left the summed gradient's local shard in the flat gradient buffer)."""
    if is_distributed(group) and not flat.sharded:
        for g in flat.grad_buffers:
            all_reduce_sum(g, group)


def global_loss_value(loss: torch.Tensor, group) -> torch.Tensor:
    """The detached loss summed over ranks (each rank's loss is its share of the global loss)."""
    v = loss.detach().clone()
    return all_reduce_sum(v, group)


def token_mean_loss(
    parts: Parts, batch: LMBatch, impl: str, group, validate: bool | None, amp_dtype: torch.dtype | None
) -> tuple[torch.Tensor, Any]:
    """Token-mean CE over the answer tokens (global token count under DDP) with the fused loss.

    Returns (loss 0-dim fp32 -- this rank's share of the global mean --, SeqLogprob of the batch)."""
    from ..ops.sequence_logprob import linear_sequence_logprob

    p = batch.prompt_len
    device = batch.input_ids.device
    with autocast(device, amp_dtype):
        hidden, _ = trunk_forward(
            parts, batch.input_ids, batch.attention_mask, batch.position_ids, use_cache=False
        )
    rows, labels = answer_rows(hidden, batch.labels, p)
    loss_dtype = amp_dtype or rows.dtype  # under autocast the lm_head runs in the autocast dtype, as in HF
    rows = rows.to(loss_dtype)
    w, b = head_args(parts.lm_head, loss_dtype)
    with autocast(device, None):  # the fused loss runs in the hidden states' dtype
        out = linear_sequence_logprob(
            rows, w, labels, bias=b, softcap=parts.softcap, shift=False, impl=impl, validate=validate
        )
    den = all_reduce_sum(out.num_tokens.sum().to(torch.float32), group)
    loss = -out.logprob.sum() / den
    return loss, out


def start_guard(optimizer, flat, config, owner: str):
    """The optimizer's :class:`~antibody_fast.guard.UpdateGuard` (checks once that the optimizer holds some of
    the trainable parameters), polled for the consecutive-skip limit. Raises before anything is changed."""
    from ..guard import guard_for

    guard = guard_for(optimizer, flat, owner)
    guard.poll(config.max_consecutive_skips if config.guard_nonfinite else None, owner)
    return guard


def finish(
    flat, optimizer, scheduler, config, guard, ok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clip (fused, on the flat grads; the norm is global over the shards under FSDP2), optimizer step,
    scheduler step, zero the flat grads.

    ``config`` is the step's config: ``max_grad_norm`` (``None`` or 0: no clipping), ``impl``,
    ``guard_nonfinite`` and ``max_consecutive_skips``. With the guard on, ``guard`` (an
    :class:`~antibody_fast.guard.UpdateGuard`) undoes the update on the device when ``ok`` (0-dim bool: the
    step's own finiteness checks) or the finiteness of the gradient norm or of the result is false.
    Returns ``(grad norm before clipping, skipped flag or None)``; no host sync."""
    from ..ops.flat_ops import clip_, sq_norm

    max_grad_norm = config.max_grad_norm or None
    grads = flat.grad_buffers
    group = flat.shard_group  # sharded: the global norm over every rank's shards
    with torch.no_grad():
        if max_grad_norm is None:
            norm = sq_norm(grads, group, impl=config.impl).sqrt()
        else:
            norm = clip_(grads, float(max_grad_norm), group, impl=config.impl)
    if not config.guard_nonfinite:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        flat.zero_grad()
        return norm, None
    with torch.no_grad():
        good = torch.isfinite(norm) & ok
    skipped = guard.step(optimizer, scheduler, good, config.max_consecutive_skips)
    flat.zero_grad()
    return norm, skipped
