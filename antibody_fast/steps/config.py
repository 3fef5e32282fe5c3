"""Options, state and statistics of the training steps (docs/design.md §2.1, §2.2, §2.3).

Every config is a dataclass with a ``validate()`` method that raises ``ValueError`` on a bad option; the steps
call it before they touch the model, the optimizer or the scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from ._validate import check_amp, check_guard, check_max_norm

__all__ = [
    "FinetuneConfig",
    "AlignConfig",
    "AlignState",
    "StepStats",
    "LAMBDA_RULES",
    "REFUSAL_SCORING",
]

LAMBDA_RULES = ("cosine", "kkt", "constant", "none")
REFUSAL_SCORING = ("prefix_cache", "full")


@dataclass
class FinetuneConfig:
    """Options of :func:`~antibody_fast.steps.weighted_step` (and :func:`~antibody_fast.steps.sft_step`, which
    ignores ``tau`` and ``refusal_scoring``).

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
        validate_data: run the data checks that read tensor values (zero-token answers/refusals, labels on
            prompt columns). ``None`` (default): only when the batch is on the CPU (they would host-sync on
            CUDA).
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
    validate_data: bool | None = None
    process_group: Any = None
    guard_nonfinite: bool = True
    max_consecutive_skips: int | None = 10

    def validate(self) -> None:
        """Raise ``ValueError`` on a bad option."""
        if not (isinstance(self.tau, (int, float)) and self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"FinetuneConfig.tau must be a finite number > 0, got {self.tau!r}")
        check_max_norm(self.max_grad_norm, "FinetuneConfig")
        if self.refusal_scoring not in REFUSAL_SCORING:
            raise ValueError(
                f"FinetuneConfig.refusal_scoring must be one of {REFUSAL_SCORING}, got {self.refusal_scoring!r}"
            )
        check_amp(self.amp_dtype, "FinetuneConfig")
        check_guard(self, "FinetuneConfig")


@dataclass
class AlignConfig:
    """Options of :func:`~antibody_fast.steps.align_step` (docs/design.md §2.2).

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
        amp_dtype, impl, validate_data, process_group, guard_nonfinite, max_consecutive_skips: as in
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
    validate_data: bool | None = None
    process_group: Any = None
    guard_nonfinite: bool = True
    max_consecutive_skips: int | None = 10

    def validate(self) -> None:
        """Raise ``ValueError`` on a bad option."""
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
        check_max_norm(self.max_grad_norm, "AlignConfig")
        check_amp(self.amp_dtype, "AlignConfig")
        check_guard(self, "AlignConfig")


class AlignState:
    """Training state of :func:`~antibody_fast.steps.align_step`: the λ EMA (a 0-dim fp32 device tensor,
    ``None`` before the first step) and the number of steps taken. Saved by
    :func:`antibody_fast.save_checkpoint`."""

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
    """Statistics of one step of any method. Every field is a tensor on the model's device (or ``None`` when
    the step does not produce it); reading them synchronises, so do it after the step (:meth:`as_dict`).

    Common:
        loss: 0-dim fp32, the loss whose gradient was applied (``weighted_step``: the weighted loss of
            docs/design.md §2.1 over the global batch; ``sft_step``: token-mean CE; ``align_step``: ``L_A``;
            ``vaccine_step``: the perturbed (pass-2) loss; ``lisa_step``: the token-mean CE without the
            proximal term).
        grad_norm: 0-dim fp32, global gradient norm before clipping.
        num_tokens: ``[B]`` int64 answer tokens per sample (``align_step``: of the alignment batch).
        skipped: 0-dim bool, true when the non-finite guard skipped the update (θ, optimizer state and λ EMA
            unchanged; ``FinetuneConfig.guard_nonfinite``). ``None`` when the guard is off.
    ``weighted_step``:
        weights: ``[B]`` fp32 softmax weights (over the global batch under DDP; per micro-batch with
            accumulation, concatenated).
        d: ``[B]`` fp32 length-normalised log-likelihood ratios ``logp(y|x)/n(y) - logp(r|x)/n(r)``.
        completion_logprob, refusal_logprob: ``[B]`` fp32 per-token mean log-probabilities of the answer and
            of the refusal.
        harmful_weight, benign_weight: 0-dim fp32 mean weight of the flagged harmful / benign samples (when
            the batch has ``is_harmful``; NaN when a group is empty; this rank's samples under DDP).
    ``align_step``:
        lambda_t: 0-dim fp32 λ after the EMA (the previous EMA when the step was skipped); lambda_raw: λ
            before it.
        cos: 0-dim fp32 ``cos(g_a, g_s)``; dots: ``[3]`` fp32 ``[<g_a,g_s>, ||g_a||^2, ||g_s||^2]``.
        loss_align, loss_harmful, loss_perturbed, loss_refusal: 0-dim fp32 ``L_A(θ)``, ``L_H(θ)``,
            ``L_H(θ')``, ``L_R(θ')`` (``None`` for passes that did not run).
        loss_combined: 0-dim fp32 ``L_A + λ_t (L_H(θ) - L_H(θ')) + λ_ref L_R(θ')``, the objective whose
            gradient is the update ``δ`` (λ_t held fixed, θ' treated as in SAM); ``L_A`` for ``rule="none"``.
    ``vaccine_step`` (docs/design.md §2.3):
        clean_loss: 0-dim fp32 pass-1 loss (no perturbation).
        perturbation_grad_norm: 0-dim fp32 ``||g||_global`` of the attention-output gradients of pass 1.
    ``lisa_step`` (docs/design.md §2.3):
        proximal: 0-dim fp32 ``rho_L/2 * ||θ - anchor||^2`` before the update (0 during the warm-up).
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
    clean_loss: torch.Tensor | None = None
    perturbation_grad_norm: torch.Tensor | None = None
    proximal: torch.Tensor | None = None

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
