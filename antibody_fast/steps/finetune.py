"""The fine-tuning stage: ``weighted_step`` (Antibody, docs/design.md §2.1) and ``sft_step`` (the plain token-mean
SFT baseline), with the lean plan of docs/design.md §3: one training forward/backward; the refusals are scored
without grad as a continuation of the prompt's key/value cache (or a full forward when the cache cannot be
reused).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._model import Parts, head_args, model_device, unwrap_ddp
from ..data.batch import FinetuneBatch, LMBatch
from ..distributed import all_reduce_max, all_reduce_sum
from ._common import (
    answer_rows,
    autocast,
    finish,
    global_loss_value,
    prepare,
    reduce_grads,
    start_guard,
    token_mean_loss,
    trunk_forward,
)
from ._validate import as_batches, check_lm_batch, check_refusal, checked_config
from .config import FinetuneConfig, StepStats

__all__ = ["weighted_step", "sft_step"]


def weighted_step(
    model: nn.Module,
    batch: FinetuneBatch | Sequence[FinetuneBatch],
    optimizer: torch.optim.Optimizer,
    config: FinetuneConfig | None = None,
    scheduler: Any = None,
) -> StepStats:
    """One Antibody fine-tuning step (docs/design.md §2.1) with the lean plan of docs/design.md §3.

    For each sample i with answer y_i and refusal r_i on the same prompt x_i::

        d_i = logp(y_i|x_i)/n(y_i) - logp(r_i|x_i)/n(r_i)      (no grad)
        w   = softmax(d / tau)                                  (over the global batch under DDP)
        L   = sum_i w_i * (-logp(y_i|x_i)) / sum_i w_i * n(y_i) (w detached)

    then backward, clip to ``config.max_grad_norm``, ``optimizer.step()``, ``scheduler.step()`` and zeroing
    of the flat grads. One training forward/backward; the refusals are scored without grad as a
    continuation of the prompt's cache (``config.refusal_scoring``); completion and refusal log-likelihoods
    come from one fused :func:`~antibody_fast.ops.paired_sequence_logprob` launch.

    Args:
        model: HF causal LM (PEFT / DDP wrapped or not) with trainable parameters on one device.
        batch: a :class:`~antibody_fast.data.FinetuneBatch` (``input_ids [B, P+Ta]``, ``refusal_ids [B, Tr]``,
            ... all int64, on the model's device), or a list of them for gradient accumulation (weights are
            normalised per micro-batch; each micro-batch loss is divided by the number of micro-batches).
        optimizer: a torch optimizer over the model's trainable parameters.
        config: :class:`FinetuneConfig` (default: ``FinetuneConfig()``).
        scheduler: optional LR scheduler, stepped once after the optimizer.

    Returns:
        :class:`StepStats` with ``loss``, ``weights [B]``, ``d [B]``, ``completion_logprob [B]``,
        ``refusal_logprob [B]``, ``num_tokens [B]``, ``grad_norm`` and, when the batch has ``is_harmful``
        flags, ``harmful_weight`` / ``benign_weight`` (device tensors; no host sync in the step).

    Raises:
        ValueError / TypeError: bad batch, model or config -- raised before anything is modified.
    """
    config = checked_config(config, FinetuneConfig, "weighted_step")
    batches = as_batches(batch, "weighted_step")
    inner = unwrap_ddp(model)
    device = model_device(inner)
    for i, mb in enumerate(batches):
        name = "weighted_step" if len(batches) == 1 else f"weighted_step: micro-batch {i}"
        if isinstance(mb, LMBatch) and not isinstance(mb, FinetuneBatch):
            raise ValueError(
                f"{name}: missing refusal: got a plain LMBatch; weighted_step needs a FinetuneBatch with refusals "
                "(use antibody_fast.data.FinetuneCollator)"
            )
        check_lm_batch(mb, device, name, config.validate_data)
        check_refusal(mb, device, name, config.validate_data)

    _, parts, flat, device = prepare(model)
    guard = start_guard(optimizer, flat, config, "weighted_step")
    group = config.process_group
    k = len(batches)
    per_sample: dict[str, list[torch.Tensor]] = {
        "weights": [],
        "d": [],
        "completion_logprob": [],
        "refusal_logprob": [],
        "num_tokens": [],
    }
    harmful_flags: list[torch.Tensor] = []
    loss_total = None
    for mb in batches:
        loss, stats = _weighted_loss(inner, parts, mb, config, device, group)
        (loss / k if k > 1 else loss).backward()
        for key in per_sample:
            per_sample[key].append(stats[key])
        if mb.is_harmful is not None:
            harmful_flags.append(mb.is_harmful.to(device=device, dtype=torch.bool))
        lv = global_loss_value(loss, group)
        loss_total = lv if loss_total is None else loss_total + lv
    reduce_grads(flat, group)
    grad_norm, skipped = finish(flat, optimizer, scheduler, config, guard, torch.isfinite(loss_total))

    cat = {key: torch.cat(v) for key, v in per_sample.items()}
    out = StepStats(loss=loss_total / k, grad_norm=grad_norm, skipped=skipped, **cat)
    if len(harmful_flags) == k:
        flags = torch.cat(harmful_flags)
        w = cat["weights"]
        hf = flags.to(w.dtype)
        out.harmful_weight = (w * hf).sum() / hf.sum()
        out.benign_weight = (w * (1 - hf)).sum() / (1 - hf).sum()
    return out


def _weighted_loss(model, parts: Parts, batch: FinetuneBatch, config: FinetuneConfig, device, group):
    from ..ops.sequence_logprob import paired_sequence_logprob

    p = batch.prompt_len
    scoring = config.refusal_scoring
    use_cache = scoring == "prefix_cache" and parts.cache_ok and not _gradient_checkpointing(parts)
    if scoring == "prefix_cache" and parts.cache_ok and not use_cache:
        _say_fallback(
            parts,
            "checkpointing",
            "activation checkpointing is on in training mode, and transformers then returns no cache",
        )
    if not use_cache:
        scoring = "full"
    with autocast(device, config.amp_dtype):
        hidden, cache = trunk_forward(
            parts, batch.input_ids, batch.attention_mask, batch.position_ids, use_cache=use_cache
        )
        ref_rows, ref_labels = _refusal_rows(model, parts, batch, hidden, cache, scoring)
        del cache
    # the fused loss runs outside autocast, in the hidden states' dtype (fp32 accumulation inside)
    with autocast(device, None):
        comp_rows, comp_labels = answer_rows(hidden, batch.labels, p)
        loss_dtype = config.amp_dtype or comp_rows.dtype  # autocast: the lm_head in the autocast dtype
        comp_rows, ref_rows = comp_rows.to(loss_dtype), ref_rows.to(loss_dtype)
        w_head, b_head = head_args(parts.lm_head, loss_dtype)
        comp, ref = paired_sequence_logprob(
            w_head,
            completion=(comp_rows, comp_labels),
            refusal=(ref_rows, ref_labels),
            bias=b_head,
            softcap=parts.softcap,
            shift=False,
            impl=config.impl,
            validate=config.validate_data,
        )
    n_c = comp.num_tokens.to(torch.float32)
    n_r = ref.num_tokens.to(torch.float32)
    lp_c = comp.logprob.detach() / n_c
    lp_r = ref.logprob.detach() / n_r
    d = lp_c - lp_r
    # softmax over the global batch from two fixed-size all-reduces (max, sum): exact, any per-rank size
    z = d / float(config.tau)
    zmax = all_reduce_max(z.max().clone(), group)
    e = torch.exp(z - zmax)
    weights = e / all_reduce_sum(e.sum(), group)
    den = all_reduce_sum((weights * n_c).sum(), group)
    loss = (weights * (-comp.logprob)).sum() / den
    stats = {
        "weights": weights,
        "d": d,
        "completion_logprob": lp_c,
        "refusal_logprob": lp_r,
        "num_tokens": comp.num_tokens,
    }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# sft_step
# ----------------------------------------------------------------------------------------------------------
def sft_step(
    model: nn.Module,
    batch: LMBatch | Sequence[LMBatch],
    optimizer: torch.optim.Optimizer,
    config: FinetuneConfig | None = None,
    scheduler: Any = None,
) -> StepStats:
    """One plain SFT step on the token-mean cross-entropy over answer tokens (HF's loss), computed with the
    same fused linear log-likelihood as :func:`weighted_step`: the fair baseline for overhead ratios.

    Args:
        model, optimizer, scheduler: as in :func:`weighted_step`.
        batch: an :class:`~antibody_fast.data.LMBatch` (``[B, P+Ta]`` int64 tensors; a FinetuneBatch's refusal
            fields are ignored) or a list of them (gradient accumulation: per-micro-batch token means, divided
            by the number of micro-batches).
        config: :class:`FinetuneConfig`; ``tau`` and ``refusal_scoring`` are ignored.

    Returns:
        :class:`StepStats` with ``loss`` (0-dim fp32, global token mean), ``grad_norm`` and ``num_tokens [B]``.
    """
    config = checked_config(config, FinetuneConfig, "sft_step")
    batches = as_batches(batch, "sft_step")
    inner = unwrap_ddp(model)
    device = model_device(inner)
    for i, mb in enumerate(batches):
        check_lm_batch(
            mb,
            device,
            "sft_step" if len(batches) == 1 else f"sft_step: micro-batch {i}",
            config.validate_data,
        )
    _, parts, flat, device = prepare(model)
    guard = start_guard(optimizer, flat, config, "sft_step")
    group = config.process_group
    k = len(batches)
    loss_total = None
    ntok = []
    for mb in batches:
        loss, out = token_mean_loss(parts, mb, config.impl, group, config.validate_data, config.amp_dtype)
        (loss / k if k > 1 else loss).backward()
        lv = global_loss_value(loss, group)
        loss_total = lv if loss_total is None else loss_total + lv
        ntok.append(out.num_tokens)
    reduce_grads(flat, group)
    grad_norm, skipped = finish(flat, optimizer, scheduler, config, guard, torch.isfinite(loss_total))
    return StepStats(loss=loss_total / k, grad_norm=grad_norm, num_tokens=torch.cat(ntok), skipped=skipped)


# ----------------------------------------------------------------------------------------------------------
# refusal scoring (no grad): a continuation of the prompt's key/value cache, or a full forward
# ----------------------------------------------------------------------------------------------------------
def _say_fallback(parts: Parts, key: str, reason: str) -> None:
    """Warn, once per model and reason, that the refusals are scored by a full forward instead of a
    continuation of the prompt's key/value cache (same result, slower)."""
    if key in parts.warned:
        return
    parts.warned.add(key)
    warnings.warn(
        "weighted_step: refusal_scoring='prefix_cache' falls back to a full forward for the refusals because "
        f"{reason}; the result is the same, only slower (said once per model)",
        RuntimeWarning,
        stacklevel=4,
    )


def _gradient_checkpointing(parts: Parts) -> bool:
    """HF decoders drop ``use_cache`` when activation checkpointing is on in training mode."""
    return bool(getattr(parts.trunk, "gradient_checkpointing", False)) and parts.trunk.training


def _cache_supported(cache) -> bool:
    """A transformers ``DynamicCache`` made of ``DynamicLayer`` s (sliding-window ones included)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except Exception:  # pragma: no cover - transformers is needed for HF models anyway
        return False
    layers = getattr(cache, "layers", None)
    return (
        isinstance(cache, DynamicCache)
        and layers is not None
        and all(isinstance(x, DynamicLayer) for x in layers)
    )


def _crop_to_prompt(cache, total_len: int, p: int, refusal_len: int) -> bool:
    """Crop ``cache`` (holding ``total_len`` tokens) to its first ``p`` tokens; False when the refusal cannot
    be scored exactly as a continuation of it (unsupported cache type; sliding-window layers whose window
    the sequence or the continuation reaches, so that the cache has dropped, or would drop, prompt keys)."""
    if not _cache_supported(cache):
        return False
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            window = getattr(layer, "sliding_window", None)
            if window is None or max(total_len, p + refusal_len) >= int(window) - 1:
                return False
        keys = getattr(layer, "keys", None)
        if keys is None or keys.shape[-2] != total_len:
            return False
    cache.crop(-(total_len - p))
    return cache.get_seq_length() == p


def _refusal_rows(
    model: nn.Module, parts: Parts, batch: FinetuneBatch, hidden: torch.Tensor, cache, scoring: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad hidden rows that score the refusal tokens: ``[B, Tr, H]`` and ``refusal_labels [B, Tr]``."""
    p = batch.prompt_len
    t = batch.input_ids.shape[1]
    with torch.no_grad():
        tr = batch.refusal_ids.shape[1]
        if scoring == "prefix_cache" and cache is not None and _crop_to_prompt(cache, t, p, tr):
            mask = torch.cat([batch.attention_mask[:, :p], batch.refusal_mask], dim=1)
            h_r, _ = trunk_forward(
                parts, batch.refusal_ids, mask, batch.refusal_positions(), use_cache=True, past=cache
            )
            # the first refusal token is predicted by the prompt's last column of the training forward
            rows = torch.cat([hidden[:, p - 1 : p].detach(), h_r[:, :-1].to(hidden.dtype)], dim=1)
        else:
            if scoring == "prefix_cache" and cache is None:
                parts.cache_ok = False  # structural: remember it and skip use_cache from now on
                _say_fallback(parts, "no-cache", "the model returned no key/value cache")
            elif scoring == "prefix_cache" and not _cache_supported(cache):
                parts.cache_ok = False
                _say_fallback(
                    parts,
                    "cache-type",
                    f"the model's key/value cache is a {type(cache).__name__}, not a DynamicCache of "
                    "DynamicLayers",
                )
            elif scoring == "prefix_cache":
                _say_fallback(
                    parts,
                    "crop",
                    "the cache cannot be cut back to the prompt exactly (a sliding-window layer's window is "
                    "reached by the sequence or the refusal, or the cache does not hold the whole sequence)",
                )
            view = batch.refusal_view()
            h_full, _ = trunk_forward(
                parts, view.input_ids, view.attention_mask, view.position_ids, use_cache=False
            )
            rows = h_full[:, p - 1 : -1].to(hidden.dtype)
    return rows, batch.refusal_labels
