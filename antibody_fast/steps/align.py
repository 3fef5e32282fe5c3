"""The alignment stage: ``align_step`` (Antibody; Booster and plain safety SFT as special cases),
docs/design.md §2.2, with the lean plan of docs/design.md §3.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
from torch import nn

from .._model import model_device, unwrap_ddp
from ..data.batch import AlignBatch, LMBatch
from ._common import finish, global_loss_value, prepare, reduce_grads, start_guard, token_mean_loss
from ._validate import check_lm_batch, checked_config
from .config import AlignConfig, AlignState, StepStats

__all__ = ["align_step", "lambda_t", "LambdaT"]

_WORK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # FlatParameters -> scratch gradient copies


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
    config = checked_config(config, AlignConfig, "align_step")
    if not isinstance(state, AlignState):
        raise TypeError(f"align_step: state must be an AlignState, got {type(state).__name__}")
    if not isinstance(batch, AlignBatch):
        raise TypeError(f"align_step: batch must be an AlignBatch, got {type(batch).__name__}")
    device = model_device(unwrap_ddp(model))
    rule = config.rule
    need_h = rule != "none"
    need_r = need_h and config.lambda_ref != 0
    check_lm_batch(batch.align, device, "align_step: batch.align", config.validate_data)
    if need_h:
        check_lm_batch(batch.harmful, device, "align_step: batch.harmful", config.validate_data)
    if need_r:
        check_lm_batch(batch.refusal, device, "align_step: batch.refusal", config.validate_data)

    _, parts, flat, device = prepare(model)
    guard = start_guard(optimizer, flat, config, "align_step")
    impl = config.impl
    from ..ops.flat_ops import antibody_combine_, grad_dots

    grad_into = _grad_into(parts, flat, config)
    grads = flat.grad_buffers
    stats = StepStats(loss=torch.zeros((), device=device), grad_norm=torch.zeros((), device=device))
    if need_h:
        work = _work_buffers(flat, 3 if need_r else 2)
        g_h, g_p = work[0], work[1]
        g_r = work[2] if need_r else None
        stats.loss_harmful = grad_into(batch.harmful, g_h)
        with flat.perturbed(g_h, config.rho, eps=1e-7, impl=impl) as pert:  # θ', restored on exit
            stats.loss_perturbed = grad_into(batch.harmful, g_p)
            if need_r:
                stats.loss_refusal = grad_into(batch.refusal, g_r)
    stats.loss_align = grad_into(batch.align, None)  # g_a, left in the flat grad buffer
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
    if need_h:
        with torch.no_grad():
            # [<g_a,g_s>, ||g_a||², ||g_s||²]; sharded: local partial sums + one all-reduce
            dots = grad_dots(grads, g_h, g_p, group=flat.shard_group, impl=impl)
            lam = lambda_t(rule, dots, state, config)
            ok = ok & torch.isfinite(lam.value)
            # δ = g_a + λ_t g_s + λ_ref g_r, in place in the flat grad buffer
            antibody_combine_(grads, grads, g_h, g_p, g_r, lam.value, float(config.lambda_ref), impl=impl)
            # the logged objective of δ (device tensors, no sync): L_A + λ_t (L_H - L_P) + λ_ref L_R
            combined = stats.loss_align + lam.value * (stats.loss_harmful - stats.loss_perturbed)
            if need_r:
                combined = combined + float(config.lambda_ref) * stats.loss_refusal
        stats.dots, stats.cos, stats.lambda_raw, stats.lambda_t = dots, lam.cos, lam.raw, lam.value
        stats.loss_combined = combined
    else:
        stats.lambda_t = torch.zeros((), dtype=torch.float32, device=device)
        stats.loss_combined = stats.loss_align
    stats.grad_norm, stats.skipped = finish(flat, optimizer, scheduler, config, guard, ok)
    if need_h:
        _commit_lambda(state, stats, lam)
    state.step += 1
    return stats


def _grad_into(parts, flat, config: AlignConfig):
    """The ``grad_into(batch, buffer) -> loss`` pass of :func:`align_step` for this model and config."""
    group = config.process_group

    def grad_into(batch: LMBatch, buffer: list[torch.Tensor] | None) -> torch.Tensor:
        """One forward/backward of the token-mean CE on ``batch`` (gradient all-reduced over ranks). With a
        ``buffer`` (one tensor per flat dtype group) the gradient is copied into it and the flat gradient
        buffer zeroed; with ``None`` it stays in the flat gradient buffer. Returns the detached global loss."""
        loss, _ = token_mean_loss(parts, batch, config.impl, group, config.validate_data, config.amp_dtype)
        loss.backward()
        reduce_grads(flat, group)
        value = global_loss_value(loss, group)
        if buffer is not None:
            with torch.no_grad():
                for d, s in zip(buffer, flat.grad_buffers):
                    d.copy_(s)
            flat.zero_grad()
        return value

    return grad_into


class LambdaT(NamedTuple):
    """The λ of one :func:`align_step` (0-dim fp32 device tensors)."""

    value: torch.Tensor  # λ_t, after the EMA
    raw: torch.Tensor  # λ_raw = rule(g_a, g_s)
    cos: torch.Tensor  # cos(g_a, g_s)
    previous: torch.Tensor | None  # the EMA before this step (on the device), None before the first


def lambda_t(rule: str, dots: torch.Tensor, state: AlignState, config: AlignConfig) -> LambdaT:
    """``λ_raw = rule(g_a, g_s)`` and its EMA ``λ_t = m λ_{t-1} + (1-m) λ_raw`` (docs/design.md §2.2).

    ``dots`` is ``[<g_a,g_s>, ||g_a||², ||g_s||²]`` (fp32, on the device). Rules (``rule != "none"``):
    ``"cosine"`` ``max(η - cos(g_a, g_s), 0)``; ``"kkt"`` ``max(η - <g_a,g_s> / (||g_s||² + 1e-8), 0)``;
    ``"constant"`` ``η``. The EMA starts at the first ``λ_raw`` (also after ``m = 0`` or a NaN EMA, which
    means every earlier step was skipped by the guard). Reads ``state``, never changes it; no host sync.
    """
    device = dots.device
    cos = _cosine(dots)
    if rule == "cosine":
        raw = (config.eta - cos).clamp(min=0.0)
    elif rule == "kkt":
        raw = (config.eta - dots[0] / (dots[2] + 1e-8)).clamp(min=0.0)
    else:  # constant
        raw = torch.full((), float(config.eta), dtype=torch.float32, device=device)
    m = float(config.momentum)
    prev = None
    if state.lambda_ema is not None:
        prev = state.lambda_ema.to(device=device, dtype=torch.float32)
    if prev is None or state.step == 0 or m == 0.0:
        lam = raw.clone()
    else:
        # a NaN EMA means "not started" (every earlier step was skipped by the guard)
        lam = torch.where(torch.isnan(prev), raw, m * prev + (1.0 - m) * raw)
    return LambdaT(lam, raw, cos, prev)


def _commit_lambda(state: AlignState, stats: StepStats, lam: LambdaT) -> None:
    """Store λ_t as the new EMA, after the optimizer step: a skipped step keeps the previous EMA (NaN = not
    started when there is none yet; AlignState.state_dict maps it back to None)."""
    value = lam.value
    if stats.skipped is not None:
        with torch.no_grad():
            keep = lam.previous if lam.previous is not None else torch.full_like(value, float("nan"))
            value = torch.where(stats.skipped, keep, value)
        stats.lambda_t = value
    state.lambda_ema = value


def _cosine(dots: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``cos(g_a, g_s) = <g_a, g_s> / (||g_a|| ||g_s|| + eps)`` from ``[<a,s>, ||a||^2, ||s||^2]``
    (the authors' formula; a zero gradient gives 0, never NaN)."""
    return dots[0] / (dots[1].clamp(min=0).sqrt() * dots[2].clamp(min=0).sqrt() + eps)


def _work_buffers(flat, n: int) -> list[list[torch.Tensor]]:
    """``n`` persistent scratch copies shaped like the flat grad buffers (allocated once per FlatParameters,
    so a re-pack allocates new ones)."""
    bufs = _WORK.get(flat)
    if bufs is None or len(bufs) < n:
        bufs = [[torch.empty_like(g) for g in flat.grad_buffers] for _ in range(n)]
        _WORK[flat] = bufs
    return bufs
