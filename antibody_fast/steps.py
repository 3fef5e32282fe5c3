"""The lean training steps: ``weighted_step`` (fine-tuning stage), ``align_step`` (alignment stage) and
``sft_step`` (the plain token-mean SFT baseline). docs/design.md §2.1, §2.2 and §3.

Every step takes an HF causal LM (PEFT-wrapped or not, optionally wrapped in ``DistributedDataParallel``),
a prompt-aligned batch (:mod:`antibody_fast.data.batch`) and a torch optimizer built on the model's
parameters, and performs one optimizer update. The model is split once into its trunk (the decoder that
returns the final hidden state), its lm_head and the logit soft-cap (``antibody_fast.models.get_trunk_and_head``);
losses are computed from the hidden states with the fused linear log-likelihood
(:func:`antibody_fast.ops.linear_sequence_logprob`), so logits are never materialised and prompt / padding rows
never reach the lm_head matmul.

Common behaviour
----------------
* **Flat parameters.** On the first step the model's trainable parameters are packed into a
  :class:`~antibody_fast.flat.FlatParameters` (cached on the model, see :func:`flat_parameters`); every
  ``param.grad`` is a view into one flat gradient buffer, so clipping, norms, perturbation and the λ
  combination are a few fused launches. Parameter objects are unchanged, so an optimizer built before the
  first step keeps working. The steps zero the flat gradient buffer themselves (before the first backward
  and after the optimizer step); do not call ``optimizer.zero_grad(set_to_none=True)`` between steps (it is
  harmless -- the views are re-attached -- but wasted work).
* **No host synchronisation** inside a step on CUDA: every statistic is returned as a device tensor in
  :class:`StepStats` (call :meth:`StepStats.as_dict` *after* the step to log them). The input validation
  that must read data (zero-token answers or refusals) runs only when ``config.validate`` is true, which by
  default (``None``) means "the batch lives on the CPU".
* **Validation before any state change.** A wrong batch type, a missing refusal, an empty batch, an answer
  or refusal with zero tokens, labels on prompt columns, a batch on another device than the model, a
  model without trainable parameters or a bad config raise ``ValueError``/``TypeError`` before the model,
  the optimizer or the scheduler is touched.
* **Non-finite guard.** A step whose loss, gradient norm, perturbation or result is not finite is undone on
  the device (``torch.where`` against a copy taken before ``optimizer.step()``): θ, the optimizer state and the
  λ EMA stay bit-identical and ``StepStats.skipped`` is true; ``max_consecutive_skips`` skipped steps in a row
  make the next step raise :class:`~antibody_fast.guard.NonFiniteError` (``config.guard_nonfinite=False`` turns
  it off; :mod:`antibody_fast.guard`, docs/reliability.md). The optimizer must hold some of the trainable
  parameters (checked once per optimizer), and the cached flat parameters are re-packed when
  ``model.to(...)`` made them stale.
* **Autocast.** ``config.amp_dtype`` (e.g. ``torch.bfloat16`` on GPU; ``None`` = off, the CPU default)
  wraps the forwards in ``torch.autocast``; the fused loss then runs in that dtype with fp32 accumulation.
* **Distributed data parallel.** When ``torch.distributed`` is initialised (world size > 1), pass the model
  unwrapped or wrapped in DDP: the steps call the underlying module directly and reduce the flat gradient
  buffer themselves with one all-reduce (SUM) per backward. Losses are normalised by *global* token counts
  (and, for ``weighted_step``, the weights are a softmax over the *global* batch), so the update equals one
  process running on the concatenation of all ranks' batches, whatever the per-rank batch sizes.
* **Gradient accumulation.** ``weighted_step`` and ``sft_step`` accept a list of micro-batches: each
  micro-batch's loss is computed on its own (for ``weighted_step`` the softmax weights are normalised per
  micro-batch, which is the authors' behaviour with HF gradient accumulation), divided by the number of
  micro-batches, and the gradients accumulate before one clip and one optimizer step.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .data.batch import IGNORE_INDEX, AlignBatch, FinetuneBatch, LMBatch
from .distributed import all_reduce_max, all_reduce_sum, is_distributed

__all__ = [
    "FinetuneConfig",
    "AlignConfig",
    "AlignState",
    "StepStats",
    "weighted_step",
    "align_step",
    "sft_step",
    "flat_parameters",
    "LAMBDA_RULES",
    "REFUSAL_SCORING",
]

LAMBDA_RULES = ("cosine", "kkt", "constant", "none")
REFUSAL_SCORING = ("prefix_cache", "full")


# ----------------------------------------------------------------------------------------------------------
# configs, state, stats
# ----------------------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """Options of :func:`weighted_step` (and :func:`sft_step`, which ignores ``tau`` and ``refusal_scoring``).

    Attributes:
        tau: softmax temperature of the sample weights ``w = softmax(d / tau)`` (> 0; docs/design.md §2.1: 1.0).
        max_grad_norm: clip the global gradient norm to this value (torch ``clip_grad_norm_`` formula);
            ``None`` disables clipping (the norm is still reported).
        refusal_scoring: ``"prefix_cache"`` (default): the refusal tokens run as a no-grad continuation of the
            training forward's key/value cache cropped to the prompt; ``"full"``: a no-grad forward over
            prompt + refusal. ``"prefix_cache"`` falls back to ``"full"`` automatically when the cache is not
            available (gradient checkpointing, a model without cache support, sliding-window layers that
            already dropped prompt keys).
        amp_dtype: autocast dtype for the forwards (``None``: no autocast).
        impl: implementation of the fused ops (``"auto"|"triton"|"cpp"|"torch"``).
        validate: run the data checks that read tensor values (zero-token answers/refusals, labels on prompt
            columns). ``None`` (default): only when the batch is on the CPU (they would host-sync on CUDA).
        process_group: ``torch.distributed`` group for the global softmax / loss denominator / gradient
            all-reduce (``None``: the default group, when initialised).
        guard_nonfinite: skip the update, on the device and with no host sync, when the loss, the gradient
            norm or the updated parameters / optimizer state are not finite: θ, the optimizer state (and
            ``AlignState``'s λ EMA) stay bit-identical and ``StepStats.skipped`` is true
            (:mod:`antibody_fast.guard`; docs/reliability.md).
        max_consecutive_skips: after this many consecutive skipped steps the next step raises
            :class:`~antibody_fast.guard.NonFiniteError` before changing anything (``None``: never).
    """

    tau: float = 1.0
    max_grad_norm: float | None = 1.0
    refusal_scoring: str = "prefix_cache"
    amp_dtype: torch.dtype | None = None
    impl: str = "auto"
    validate: bool | None = None
    process_group: Any = None
    guard_nonfinite: bool = True
    max_consecutive_skips: int | None = 10

    def check(self) -> None:
        if not (isinstance(self.tau, (int, float)) and self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"FinetuneConfig.tau must be a finite number > 0, got {self.tau!r}")
        _check_max_norm(self.max_grad_norm, "FinetuneConfig")
        if self.refusal_scoring not in REFUSAL_SCORING:
            raise ValueError(
                f"FinetuneConfig.refusal_scoring must be one of {REFUSAL_SCORING}, got {self.refusal_scoring!r}"
            )
        _check_amp(self.amp_dtype, "FinetuneConfig")
        _check_guard(self, "FinetuneConfig")


@dataclass
class AlignConfig:
    """Options of :func:`align_step` (docs/design.md §2.2).

    Attributes:
        rule: how ``λ_raw`` is computed from ``g_a`` and ``g_s = g_h - g_p``:
            ``"cosine"`` (default, authors' code) ``max(eta - cos(g_a, g_s), 0)``;
            ``"kkt"`` (paper) ``max(eta - <g_a, g_s> / (||g_s||^2 + 1e-8), 0)``;
            ``"constant"`` (Booster) ``eta``;
            ``"none"``: plain safety SFT, ``δ = g_a`` (only the alignment pass runs; ``eta``, ``rho``,
            ``lambda_ref`` and ``momentum`` are ignored).
            Booster is ``rule="constant", lambda_ref=0``.
        eta: η (5.0).
        rho: perturbation radius ρ of ``θ' = θ - ρ g_h / (||g_h|| + 1e-7)`` (0.1).
        lambda_ref: weight of the refusal gradient ``g_r = ∇L_R(θ')`` (0.05); 0 skips that pass.
        momentum: EMA momentum ``m`` of λ (0.99); the EMA starts at the first ``λ_raw``; 0 disables it.
        max_grad_norm: clip ``||δ||`` to this value (``None``: no clipping).
        amp_dtype, impl, validate, process_group, guard_nonfinite, max_consecutive_skips: as in
            :class:`FinetuneConfig` (the guard also skips a step whose perturbation norm is not finite).
    """

    rule: str = "cosine"
    eta: float = 5.0
    rho: float = 0.1
    lambda_ref: float = 0.05
    momentum: float = 0.99
    max_grad_norm: float | None = 1.0
    amp_dtype: torch.dtype | None = None
    impl: str = "auto"
    validate: bool | None = None
    process_group: Any = None
    guard_nonfinite: bool = True
    max_consecutive_skips: int | None = 10

    def check(self) -> None:
        if self.rule not in LAMBDA_RULES:
            raise ValueError(f"AlignConfig.rule must be one of {LAMBDA_RULES}, got {self.rule!r}")
        for name in ("eta", "rho", "lambda_ref", "momentum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"AlignConfig.{name} must be a finite number, got {v!r}")
        if self.rho < 0 or self.lambda_ref < 0:
            raise ValueError(
                f"AlignConfig: rho and lambda_ref must be >= 0, got {self.rho!r}, {self.lambda_ref!r}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"AlignConfig.momentum must be in [0, 1), got {self.momentum!r}")
        _check_max_norm(self.max_grad_norm, "AlignConfig")
        _check_amp(self.amp_dtype, "AlignConfig")
        _check_guard(self, "AlignConfig")


def _checked_config(config, cls: type, owner: str):
    """``config`` (``cls()`` when None), type-checked and validated; raises before anything is modified."""
    config = cls() if config is None else config
    if not isinstance(config, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise TypeError(f"{owner}: config must be {article} {cls.__name__}, got {type(config).__name__}")
    config.check()
    return config


def _check_max_norm(v, owner: str) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise ValueError(f"{owner}.max_grad_norm must be None or a finite number > 0, got {v!r}")


def _check_guard(cfg, owner: str) -> None:
    if not isinstance(cfg.guard_nonfinite, bool):
        raise ValueError(f"{owner}.guard_nonfinite must be a bool, got {cfg.guard_nonfinite!r}")
    m = cfg.max_consecutive_skips
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"{owner}.max_consecutive_skips must be None or an int >= 1, got {m!r}")


def _check_amp(v, owner: str) -> None:
    if v is not None and v not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{owner}.amp_dtype must be None, torch.bfloat16 or torch.float16, got {v!r}")


class AlignState:
    """Training state of :func:`align_step`: the λ EMA (a 0-dim fp32 device tensor, ``None`` before the
    first step) and the number of steps taken. Saved by :func:`antibody_fast.save_checkpoint`."""

    def __init__(self) -> None:
        self.lambda_ema: torch.Tensor | None = None
        self.step: int = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"lambda_ema": 0-dim fp32 CPU tensor or None, "step": int}`` (a NaN EMA -- every step so far was
        skipped by the non-finite guard -- is stored as None: not started)."""
        lam = None if self.lambda_ema is None else self.lambda_ema.detach().to("cpu", copy=True)
        if lam is not None and bool(torch.isnan(lam)):
            lam = None
        return {"lambda_ema": lam, "step": int(self.step)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not isinstance(sd, dict) or "lambda_ema" not in sd or "step" not in sd:
            raise ValueError("AlignState.load_state_dict: expected a dict with 'lambda_ema' and 'step'")
        lam = sd["lambda_ema"]
        if lam is not None and (not isinstance(lam, torch.Tensor) or lam.numel() != 1):
            raise ValueError("AlignState.load_state_dict: 'lambda_ema' must be None or a 1-element tensor")
        step = int(sd["step"])
        if step < 0:
            raise ValueError(f"AlignState.load_state_dict: negative step {step}")
        # kept on the CPU until the next align_step moves it to the model's device
        self.lambda_ema = None if lam is None else lam.detach().reshape(()).to(torch.float32).clone()
        self.step = step

    def __repr__(self) -> str:
        return f"AlignState(step={self.step}, lambda_ema={self.lambda_ema!r})"


@dataclass
class StepStats:
    """Statistics of one step. Every field is a tensor on the model's device (or ``None`` when the step does
    not produce it); reading them synchronises, so do it after the step (:meth:`as_dict`).

    Common:
        loss: 0-dim fp32, the loss whose gradient was applied (``weighted_step``: the weighted loss of
            docs/design.md §2.1 over the global batch; ``sft_step``: token-mean CE; ``align_step``: ``L_A``).
        grad_norm: 0-dim fp32, global gradient norm before clipping.
        num_tokens: ``[B]`` int64 answer tokens per sample (``align_step``: of the alignment batch).
    ``weighted_step``:
        weights: ``[B]`` fp32 softmax weights (over the global batch under DDP; per micro-batch with
            accumulation, concatenated).
        d: ``[B]`` fp32 length-normalised log-likelihood ratios ``logp(y|x)/n(y) - logp(r|x)/n(r)``.
        completion_logprob, refusal_logprob: ``[B]`` fp32 per-token mean log-probabilities of the answer and
            of the refusal.
        harmful_weight, benign_weight: 0-dim fp32 mean weight of the flagged harmful / benign samples (when
            the batch has ``is_harmful``; NaN when a group is empty; this rank's samples under DDP).
        skipped: 0-dim bool, true when the non-finite guard skipped the update (θ, optimizer state and λ EMA
            unchanged; ``FinetuneConfig.guard_nonfinite``). ``None`` when the guard is off.
    ``align_step``:
        lambda_t: 0-dim fp32 λ after the EMA (the previous EMA when the step was skipped); lambda_raw: λ
            before it.
        cos: 0-dim fp32 ``cos(g_a, g_s)``; dots: ``[3]`` fp32 ``[<g_a,g_s>, ||g_a||^2, ||g_s||^2]``.
        loss_align, loss_harmful, loss_perturbed, loss_refusal: 0-dim fp32 ``L_A(θ)``, ``L_H(θ)``,
            ``L_H(θ')``, ``L_R(θ')`` (``None`` for passes that did not run).
        loss_combined: 0-dim fp32 ``L_A + λ_t (L_H(θ) - L_H(θ')) + λ_ref L_R(θ')``, the objective whose
            gradient is the update ``δ`` (λ_t held fixed, θ' treated as in SAM); ``L_A`` for ``rule="none"``.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    num_tokens: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    d: torch.Tensor | None = None
    completion_logprob: torch.Tensor | None = None
    refusal_logprob: torch.Tensor | None = None
    harmful_weight: torch.Tensor | None = None
    benign_weight: torch.Tensor | None = None
    lambda_t: torch.Tensor | None = None
    lambda_raw: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    dots: torch.Tensor | None = None
    loss_align: torch.Tensor | None = None
    loss_harmful: torch.Tensor | None = None
    loss_perturbed: torch.Tensor | None = None
    loss_refusal: torch.Tensor | None = None
    loss_combined: torch.Tensor | None = None
    skipped: torch.Tensor | None = None

    def as_dict(self) -> dict[str, float | list[float]]:
        """Host copy for logging (synchronises): 0-dim tensors become floats, vectors lists."""
        out: dict[str, float | list[float]] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            v = v.detach().cpu()
            out[f.name] = v.item() if v.dim() == 0 else v.tolist()
        return out


# ----------------------------------------------------------------------------------------------------------
# model plumbing
# ----------------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@dataclass
class _Parts:
    trunk: nn.Module
    lm_head: nn.Module
    softcap: float | None
    cache_ok: bool = True  # False once the model returned no (or an unsupported) cache


_PARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FLAT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WORK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _parts(model: nn.Module) -> _Parts:
    parts = _PARTS.get(model)
    if parts is None:
        from .models import get_trunk_and_head

        trunk, lm_head, softcap = get_trunk_and_head(model)
        parts = _Parts(trunk, lm_head, softcap)
        _PARTS[model] = parts
    return parts


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _model_device(model: nn.Module) -> torch.device:
    params = _trainable(model)
    if not params:
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True); nothing to optimise "
            "(e.g. add LoRA adapters, or unfreeze some parameters)"
        )
    return params[0].device


def flat_parameters(model: nn.Module):
    """The :class:`~antibody_fast.flat.FlatParameters` of ``model``'s trainable parameters, created on first
    use and cached (weakly) on the model; re-packed if the set of trainable parameters changed or the cached
    buffers went stale (``model.to(dtype/device)`` after packing: an O(1) fingerprint check per call)."""
    model = _unwrap(model)
    flat = _FLAT.get(model)
    params = _trainable(model)
    if flat is not None and _flat_matches(flat, params) and not flat.is_stale():
        return flat
    from .flat import FlatParameters

    flat = FlatParameters(model)
    _FLAT[model] = flat
    _WORK.pop(model, None)
    return flat


def _flat_matches(flat, params: list[nn.Parameter]) -> bool:
    mine = flat.parameters
    return len(mine) == len(params) and all(a is b for a, b in zip(mine, params))


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    ia = a.index if a.index is not None else torch.cuda.current_device()
    ib = b.index if b.index is not None else torch.cuda.current_device()
    return ia == ib


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _head_args(parts: _Parts, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lm_head weight / bias in ``dtype`` (the loss dtype: the autocast dtype, else the hidden states')."""
    w = parts.lm_head.weight
    b = getattr(parts.lm_head, "bias", None)
    if w.dtype != dtype:
        w = w.to(dtype)
        b = None if b is None else b.to(dtype)
    return w, b


def _trunk_forward(parts: _Parts, input_ids, attention_mask, position_ids, *, use_cache: bool, past=None):
    out = parts.trunk(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past,
        use_cache=use_cache,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    cache = getattr(out, "past_key_values", None) if use_cache else None
    return hidden, cache


def _answer_rows(hidden: torch.Tensor, labels: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that score the answer: hidden column t predicts label t+1, and labels before column ``p`` are
    ignored (prompt), so only columns ``p-1 .. T-2`` reach the lm_head. ``[B, T-p, H]``, ``[B, T-p]``."""
    return hidden[:, p - 1 : -1], labels[:, p:]


def _gradient_checkpointing(parts: _Parts) -> bool:
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
    model: nn.Module, parts: _Parts, batch: FinetuneBatch, hidden: torch.Tensor, cache, scoring: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad hidden rows that score the refusal tokens: ``[B, Tr, H]`` and ``refusal_labels [B, Tr]``."""
    p = batch.prompt_len
    t = batch.input_ids.shape[1]
    with torch.no_grad():
        tr = batch.refusal_ids.shape[1]
        if scoring == "prefix_cache" and cache is not None and _crop_to_prompt(cache, t, p, tr):
            mask = torch.cat([batch.attention_mask[:, :p], batch.refusal_mask], dim=1)
            h_r, _ = _trunk_forward(
                parts, batch.refusal_ids, mask, batch.refusal_positions(), use_cache=True, past=cache
            )
            # the first refusal token is predicted by the prompt's last column of the training forward
            rows = torch.cat([hidden[:, p - 1 : p].detach(), h_r[:, :-1].to(hidden.dtype)], dim=1)
        else:
            if scoring == "prefix_cache" and not _cache_supported(cache):
                parts.cache_ok = False  # structural: remember it and skip use_cache from now on
            view = batch.refusal_view()
            h_full, _ = _trunk_forward(
                parts, view.input_ids, view.attention_mask, view.position_ids, use_cache=False
            )
            rows = h_full[:, p - 1 : -1].to(hidden.dtype)
    return rows, batch.refusal_labels


# ----------------------------------------------------------------------------------------------------------
# validation (before any state change)
# ----------------------------------------------------------------------------------------------------------
def _check_lm_batch(batch, device: torch.device, name: str, validate: bool | None) -> None:
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
        if not _same_device(x.device, device):
            raise ValueError(
                f"{name}: {field_name} is on {x.device} but the model's trainable parameters are on {device}; "
                f"move the batch with batch.to({str(device)!r})"
            )
    if _do_validate(validate, ids):
        n = batch.num_answer_tokens
        if bool((n == 0).any()):
            bad = torch.nonzero(n == 0).flatten().tolist()
            raise ValueError(
                f"{name}: samples {bad[:10]} have zero answer tokens (response truncated to nothing); "
                "drop them or raise max_length"
            )
        if bool((batch.labels[:, :p] != IGNORE_INDEX).any()):
            raise ValueError(f"{name}: labels on prompt columns (< prompt_len={p}) must be {IGNORE_INDEX}")


def _check_refusal(batch, device: torch.device, name: str, validate: bool | None) -> None:
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
        if not _same_device(x.device, device):
            raise ValueError(f"{name}: {field_name} is on {x.device} but the model is on {device}")
    if batch.refusal_ids.shape[1] == 0:
        raise ValueError(f"{name}: missing refusal: refusal_ids has zero columns")
    if _do_validate(validate, batch.refusal_ids):
        n = batch.num_refusal_tokens
        if bool((n == 0).any()):
            bad = torch.nonzero(n == 0).flatten().tolist()
            raise ValueError(f"{name}: samples {bad[:10]} have an empty refusal (zero refusal tokens)")


def _do_validate(validate: bool | None, t: torch.Tensor) -> bool:
    return t.device.type == "cpu" if validate is None else bool(validate)


def _as_batches(batch, name: str) -> list:
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError(f"{name}: empty list of micro-batches")
        return list(batch)
    return [batch]


# ----------------------------------------------------------------------------------------------------------
# shared pieces of the steps
# ----------------------------------------------------------------------------------------------------------
def _prepare(model: nn.Module):
    """(inner model, parts, flat, device) with the flat grads attached and zeroed."""
    inner = _unwrap(model)
    device = _model_device(inner)
    parts = _parts(inner)
    flat = flat_parameters(inner)
    flat.zero_grad()
    return inner, parts, flat, device


def _reduce_grads(flat, group) -> None:
    if is_distributed(group):
        for g in flat.grad_buffers:
            all_reduce_sum(g, group)


def _start_guard(optimizer, flat, config, owner: str):
    """The optimizer's :class:`~antibody_fast.guard.UpdateGuard` (checks once that the optimizer holds some of
    the trainable parameters), polled for the consecutive-skip limit. Raises before anything is changed."""
    from .guard import guard_for

    guard = guard_for(optimizer, flat, owner)
    guard.poll(config.max_consecutive_skips if config.guard_nonfinite else None, owner)
    return guard


def _finish(
    flat,
    optimizer,
    scheduler,
    max_grad_norm,
    impl: str,
    *,
    guard=None,
    ok: torch.Tensor | None = None,
    max_consecutive_skips: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clip (fused, on the flat grads), optimizer step, scheduler step, zero the flat grads.

    With ``guard`` (an :class:`~antibody_fast.guard.UpdateGuard`) the update is undone on the device when
    ``ok`` (0-dim bool: the step's own finiteness checks) or the finiteness of the gradient norm or of the
    result is false. Returns ``(grad norm before clipping, skipped flag or None)``; no host sync."""
    from .ops.flat_ops import clip_, sq_norm

    grads = flat.grad_buffers
    with torch.no_grad():
        if max_grad_norm is None:
            norm = sq_norm(grads, impl=impl).sqrt()
        else:
            norm = clip_(grads, float(max_grad_norm), impl=impl)
    if guard is None:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        flat.zero_grad()
        return norm, None
    with torch.no_grad():
        good = torch.isfinite(norm)
        if ok is not None:
            good = good & ok
    skipped = guard.step(optimizer, scheduler, good, max_consecutive_skips)
    flat.zero_grad()
    return norm, skipped


def _token_mean_loss(
    parts: _Parts, batch: LMBatch, impl: str, group, validate: bool | None, amp_dtype: torch.dtype | None
) -> tuple[torch.Tensor, Any]:
    """Token-mean CE over the answer tokens (global token count under DDP) with the fused loss.

    Returns (loss 0-dim fp32 -- this rank's share of the global mean --, SeqLogprob of the batch)."""
    from .ops.sequence_logprob import linear_sequence_logprob

    p = batch.prompt_len
    device = batch.input_ids.device
    with _autocast(device, amp_dtype):
        hidden, _ = _trunk_forward(
            parts, batch.input_ids, batch.attention_mask, batch.position_ids, use_cache=False
        )
    rows, labels = _answer_rows(hidden, batch.labels, p)
    loss_dtype = amp_dtype or rows.dtype  # under autocast the lm_head runs in the autocast dtype, as in HF
    rows = rows.to(loss_dtype)
    w, b = _head_args(parts, loss_dtype)
    with _autocast(device, None):  # the fused loss runs in the hidden states' dtype
        out = linear_sequence_logprob(
            rows, w, labels, bias=b, softcap=parts.softcap, shift=False, impl=impl, validate=validate
        )
    den = all_reduce_sum(out.num_tokens.sum().to(torch.float32), group)
    loss = -out.logprob.sum() / den
    return loss, out


def _finish_config(flat, optimizer, scheduler, config, guard, ok: torch.Tensor):
    """:func:`_finish` with a step config's clip, impl and non-finite guard options."""
    return _finish(
        flat,
        optimizer,
        scheduler,
        config.max_grad_norm,
        config.impl,
        guard=guard if config.guard_nonfinite else None,
        ok=ok,
        max_consecutive_skips=config.max_consecutive_skips,
    )


def _global_loss_value(loss: torch.Tensor, group) -> torch.Tensor:
    """The detached loss summed over ranks (each rank's loss is its share of the global loss)."""
    v = loss.detach().clone()
    return all_reduce_sum(v, group)


# ----------------------------------------------------------------------------------------------------------
# weighted_step
# ----------------------------------------------------------------------------------------------------------
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
    config = _checked_config(config, FinetuneConfig, "weighted_step")
    batches = _as_batches(batch, "weighted_step")
    inner = _unwrap(model)
    device = _model_device(inner)
    for i, mb in enumerate(batches):
        name = "weighted_step" if len(batches) == 1 else f"weighted_step: micro-batch {i}"
        if isinstance(mb, LMBatch) and not isinstance(mb, FinetuneBatch):
            raise ValueError(
                f"{name}: missing refusal: got a plain LMBatch; weighted_step needs a FinetuneBatch with refusals "
                "(use antibody_fast.data.FinetuneCollator)"
            )
        _check_lm_batch(mb, device, name, config.validate)
        _check_refusal(mb, device, name, config.validate)

    _, parts, flat, device = _prepare(model)
    guard = _start_guard(optimizer, flat, config, "weighted_step")
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
        lv = _global_loss_value(loss, group)
        loss_total = lv if loss_total is None else loss_total + lv
    _reduce_grads(flat, group)
    grad_norm, skipped = _finish_config(flat, optimizer, scheduler, config, guard, torch.isfinite(loss_total))

    cat = {key: torch.cat(v) for key, v in per_sample.items()}
    out = StepStats(loss=loss_total / k, grad_norm=grad_norm, skipped=skipped, **cat)
    if len(harmful_flags) == k:
        flags = torch.cat(harmful_flags)
        w = cat["weights"]
        hf = flags.to(w.dtype)
        out.harmful_weight = (w * hf).sum() / hf.sum()
        out.benign_weight = (w * (1 - hf)).sum() / (1 - hf).sum()
    return out


def _weighted_loss(model, parts: _Parts, batch: FinetuneBatch, config: FinetuneConfig, device, group):
    from .ops.sequence_logprob import paired_sequence_logprob

    p = batch.prompt_len
    scoring = config.refusal_scoring
    use_cache = scoring == "prefix_cache" and parts.cache_ok and not _gradient_checkpointing(parts)
    if not use_cache:
        scoring = "full"
    with _autocast(device, config.amp_dtype):
        hidden, cache = _trunk_forward(
            parts, batch.input_ids, batch.attention_mask, batch.position_ids, use_cache=use_cache
        )
        ref_rows, ref_labels = _refusal_rows(model, parts, batch, hidden, cache, scoring)
        del cache
    # the fused loss runs outside autocast, in the hidden states' dtype (fp32 accumulation inside)
    with _autocast(device, None):
        comp_rows, comp_labels = _answer_rows(hidden, batch.labels, p)
        loss_dtype = config.amp_dtype or comp_rows.dtype  # autocast: the lm_head in the autocast dtype
        comp_rows, ref_rows = comp_rows.to(loss_dtype), ref_rows.to(loss_dtype)
        w_head, b_head = _head_args(parts, loss_dtype)
        comp, ref = paired_sequence_logprob(
            w_head,
            completion=(comp_rows, comp_labels),
            refusal=(ref_rows, ref_labels),
            bias=b_head,
            softcap=parts.softcap,
            shift=False,
            impl=config.impl,
            validate=config.validate,
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
    config = _checked_config(config, FinetuneConfig, "sft_step")
    batches = _as_batches(batch, "sft_step")
    inner = _unwrap(model)
    device = _model_device(inner)
    for i, mb in enumerate(batches):
        _check_lm_batch(
            mb, device, "sft_step" if len(batches) == 1 else f"sft_step: micro-batch {i}", config.validate
        )
    _, parts, flat, device = _prepare(model)
    guard = _start_guard(optimizer, flat, config, "sft_step")
    group = config.process_group
    k = len(batches)
    loss_total = None
    ntok = []
    for mb in batches:
        loss, out = _token_mean_loss(parts, mb, config.impl, group, config.validate, config.amp_dtype)
        (loss / k if k > 1 else loss).backward()
        lv = _global_loss_value(loss, group)
        loss_total = lv if loss_total is None else loss_total + lv
        ntok.append(out.num_tokens)
    _reduce_grads(flat, group)
    grad_norm, skipped = _finish_config(flat, optimizer, scheduler, config, guard, torch.isfinite(loss_total))
    return StepStats(loss=loss_total / k, grad_norm=grad_norm, num_tokens=torch.cat(ntok), skipped=skipped)


# ----------------------------------------------------------------------------------------------------------
# align_step
# ----------------------------------------------------------------------------------------------------------
def _work_buffers(model: nn.Module, flat, n: int) -> list[list[torch.Tensor]]:
    """``n`` persistent scratch copies shaped like the flat grad buffers (allocated once per model)."""
    bufs = _WORK.get(model)
    if bufs is None or len(bufs) < n:
        bufs = [[torch.empty_like(g) for g in flat.grad_buffers] for _ in range(n)]
        _WORK[model] = bufs
    return bufs


def _copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)


def align_step(
    model: nn.Module,
    batch: AlignBatch,
    optimizer: torch.optim.Optimizer,
    state: AlignState,
    config: AlignConfig | None = None,
    scheduler: Any = None,
) -> StepStats:
    """One Antibody alignment step (docs/design.md §2.2): four forward/backward passes, an in-place perturbation of
    the flat parameter buffer (restored bitwise), fused dots / combine / clip, no model copy, no host sync::

        g_h = ∇L_H(θ);  θ' = θ - ρ g_h/(||g_h||+1e-7);  g_p = ∇L_H(θ');  g_r = ∇L_R(θ');  restore θ
        g_a = ∇L_A(θ);  g_s = g_h - g_p;  λ_raw = rule(g_a, g_s);  λ_t = m λ_{t-1} + (1-m) λ_raw
        δ = g_a + λ_t g_s + λ_ref g_r;  clip ||δ||;  optimizer step on δ

    Every L is the token-mean CE over answer tokens (fused, logits never materialised).
    ``rule="constant", lambda_ref=0`` is Booster (3 passes); ``rule="none"`` is plain safety SFT on A
    (1 pass); ``lambda_ref=0`` skips the ``g_r`` pass.

    Args:
        model: HF causal LM (PEFT / DDP wrapped or not).
        batch: :class:`~antibody_fast.data.AlignBatch` with the A (harmful prompt -> refusal), H (harmful
            prompt -> harmful answer) and R (H's prompts -> refusal) :class:`LMBatch` es (``[B, P+T]`` int64).
        optimizer: torch optimizer over the trainable parameters.
        state: :class:`AlignState`; its λ EMA (0-dim fp32 device tensor) and step count are updated.
        config: :class:`AlignConfig`.
        scheduler: optional LR scheduler, stepped after the optimizer.

    Returns:
        :class:`StepStats` with ``loss`` (= ``L_A``), ``grad_norm`` (of δ before clipping), ``lambda_t``,
        ``lambda_raw``, ``cos``, ``dots``, the four losses, ``loss_combined`` (the objective of δ) and
        ``num_tokens`` of A.
    """
    config = _checked_config(config, AlignConfig, "align_step")
    if not isinstance(state, AlignState):
        raise TypeError(f"align_step: state must be an AlignState, got {type(state).__name__}")
    if not isinstance(batch, AlignBatch):
        raise TypeError(f"align_step: batch must be an AlignBatch, got {type(batch).__name__}")
    inner = _unwrap(model)
    device = _model_device(inner)
    rule = config.rule
    need_h = rule != "none"
    need_r = need_h and config.lambda_ref != 0
    _check_lm_batch(batch.align, device, "align_step: batch.align", config.validate)
    if need_h:
        _check_lm_batch(batch.harmful, device, "align_step: batch.harmful", config.validate)
    if need_r:
        _check_lm_batch(batch.refusal, device, "align_step: batch.refusal", config.validate)

    _, parts, flat, device = _prepare(model)
    guard = _start_guard(optimizer, flat, config, "align_step")
    group = config.process_group
    impl = config.impl
    from .ops.flat_ops import antibody_combine_, grad_dots

    def pass_(lm_batch: LMBatch) -> torch.Tensor:
        loss, _ = _token_mean_loss(parts, lm_batch, impl, group, config.validate, config.amp_dtype)
        loss.backward()
        _reduce_grads(flat, group)
        return _global_loss_value(loss, group)

    grads = flat.grad_buffers
    stats = StepStats(loss=torch.zeros((), device=device), grad_norm=torch.zeros((), device=device))
    if need_h:
        work = _work_buffers(inner, flat, 3 if need_r else 2)
        g_h, g_p = work[0], work[1]
        g_r = work[2] if need_r else None
        stats.loss_harmful = pass_(batch.harmful)  # g_h
        with torch.no_grad():
            _copy_into(g_h, grads)
        flat.zero_grad()
        with flat.perturbed(g_h, config.rho, eps=1e-7, impl=impl) as pert:
            stats.loss_perturbed = pass_(batch.harmful)  # g_p
            with torch.no_grad():
                _copy_into(g_p, grads)
            flat.zero_grad()
            if need_r:
                stats.loss_refusal = pass_(batch.refusal)  # g_r
                with torch.no_grad():
                    _copy_into(g_r, grads)
                flat.zero_grad()
    stats.loss_align = pass_(batch.align)  # g_a, left in the flat grad buffer
    stats.loss = stats.loss_align
    stats.num_tokens = batch.align.num_answer_tokens

    with torch.no_grad():
        ok = torch.isfinite(stats.loss_align)
        if need_h:
            ok = (
                ok
                & torch.isfinite(stats.loss_harmful)
                & torch.isfinite(stats.loss_perturbed)
                & ~pert.nonfinite
            )
        if need_r:
            ok = ok & torch.isfinite(stats.loss_refusal)
    prev = None
    if need_h:
        with torch.no_grad():
            dots = grad_dots(grads, g_h, g_p, impl=impl)
            cos = _cosine(dots)
            if rule == "cosine":
                raw = (config.eta - cos).clamp(min=0.0)
            elif rule == "kkt":
                raw = (config.eta - dots[0] / (dots[2] + 1e-8)).clamp(min=0.0)
            else:  # constant
                raw = torch.full((), float(config.eta), dtype=torch.float32, device=device)
            m = float(config.momentum)
            if state.lambda_ema is not None:
                prev = state.lambda_ema.to(device=device, dtype=torch.float32)
            if prev is None or state.step == 0 or m == 0.0:
                lam = raw.clone()
            else:
                # a NaN EMA means "not started" (every earlier step was skipped by the guard)
                lam = torch.where(torch.isnan(prev), raw, m * prev + (1.0 - m) * raw)
            ok = ok & torch.isfinite(lam)
            antibody_combine_(grads, grads, g_h, g_p, g_r, lam, float(config.lambda_ref), impl=impl)
            # the logged objective of δ (device tensors, no sync): L_A + λ_t (L_H - L_P) + λ_ref L_R
            combined = stats.loss_align + lam * (stats.loss_harmful - stats.loss_perturbed)
            if need_r:
                combined = combined + float(config.lambda_ref) * stats.loss_refusal
        stats.dots, stats.cos, stats.lambda_raw, stats.lambda_t = dots, cos, raw, lam
        stats.loss_combined = combined
    else:
        stats.lambda_t = torch.zeros((), dtype=torch.float32, device=device)
        stats.loss_combined = stats.loss_align
    stats.grad_norm, stats.skipped = _finish_config(flat, optimizer, scheduler, config, guard, ok)
    # AlignState changes only after the optimizer step succeeded; a skipped step keeps the previous EMA
    # (NaN = not started when there is none yet; AlignState.state_dict maps it back to None).
    if need_h:
        if stats.skipped is not None:
            with torch.no_grad():
                keep = prev if prev is not None else torch.full_like(lam, float("nan"))
                lam = torch.where(stats.skipped, keep, lam)
            stats.lambda_t = lam
        state.lambda_ema = lam
    state.step += 1
    return stats


def _cosine(dots: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``cos(g_a, g_s) = <g_a, g_s> / (||g_a|| ||g_s|| + eps)`` from ``[<a,s>, ||a||^2, ||s||^2]``
    (the authors' formula; a zero gradient gives 0, never NaN)."""
    return dots[0] / (dots[1].clamp(min=0).sqrt() * dots[2].clamp(min=0).sqrt() + eps)
