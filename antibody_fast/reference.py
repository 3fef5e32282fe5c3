"""The authors' algorithm written naively: the tests' oracle and the benchmarks' "authors-style" provider.

Nothing here is fast on purpose. It follows the pass structure of the authors' implementation:

* fine-tuning (:func:`reference_finetune_step`): 3 forwards + 1 backward per step -- a no-grad forward of
  (prompt, answer), a no-grad forward of (prompt, refusal), then a forward/backward of (prompt, answer);
  full fp32 logits are materialised and reduced with ``log_softmax``;
* alignment (:func:`reference_align_step`): 5 forwards + 5 backwards and a ``copy.deepcopy`` of the whole
  model per step; the perturbation is applied to the copy, the gradients are kept in per-parameter dicts of
  clones, and every vector operation is a Python loop over named parameters; losses are HF's own
  (``model(..., labels=...).loss``, token-mean cross-entropy over the answer tokens);
* :func:`reference_sft_step`: HF's own plain SFT step, the "HF SFT" baseline.

The *update* computed is exactly docs/design.md §2.1 / §2.2. This module is independent of
:mod:`antibody_fast.steps`, which it checks. Models must be deterministic (no dropout) for comparisons.
"""

from __future__ import annotations

import copy
import math

import torch

from ._model import named_trainable, trainable_params
from .data.batch import IGNORE_INDEX, AlignBatch, FinetuneBatch, LMBatch

__all__ = [
    "sequence_logprobs",
    "hf_loss",
    "reference_finetune_step",
    "reference_align_step",
    "reference_sft_step",
    "ALIGN_RULES",
]

ALIGN_RULES = ("cosine", "kkt", "constant")
COS_EPS = 1e-8  # cos(a, s) = <a, s> / (||a|| ||s|| + COS_EPS)
KKT_EPS = 1e-8  # <a, s> / (||s||^2 + KKT_EPS)
PERTURB_EPS = 1e-7  # theta' = theta - rho * g / (||g|| + PERTURB_EPS)


def _check_lm_batch(batch, what: str) -> None:
    if not isinstance(batch, LMBatch):
        raise TypeError(f"{what} must be an LMBatch, got {type(batch).__name__}")
    if batch.input_ids.shape[0] == 0:
        raise ValueError(f"{what} is empty")


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    params = named_trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    return params


def sequence_logprobs(model: torch.nn.Module, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``log p(answer | prompt)`` from full materialised logits.

    Returns ``(logprob [B] fp32, num_tokens [B] int64)``. Runs one forward of ``model`` on
    ``batch.input_ids`` with the batch's attention mask and position ids; differentiable when grad is enabled.
    The model's own logit processing (e.g. Gemma-2's final softcap) is included.
    """
    logits = model(**batch.model_inputs()).logits.float()
    labels = batch.labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(dim=1), mask.sum(dim=1)


def hf_loss(model: torch.nn.Module, batch: LMBatch) -> torch.Tensor:
    """HF's own token-mean cross-entropy over the answer tokens: ``model(..., labels=...).loss``."""
    return model(**batch.model_inputs(), labels=batch.labels, use_cache=False).loss


def _clip_and_step(model, optimizer, max_grad_norm, scheduler) -> torch.Tensor:
    params = trainable_params(model)
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        grad_norm = torch.stack(grads).norm() if grads else torch.zeros(())
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach()


def reference_finetune_step(
    model: torch.nn.Module,
    batch: FinetuneBatch,
    optimizer: torch.optim.Optimizer,
    *,
    tau: float = 1.0,
    max_grad_norm: float | None = 1.0,
    scheduler=None,
) -> dict[str, torch.Tensor]:
    """One authors-style Antibody fine-tuning step (docs/design.md §2.1): 3 forwards + 1 backward.

    ``d_i = logp(y_i|x_i)/n(y_i) - logp(r_i|x_i)/n(r_i)``, ``w = softmax(d / tau)`` and
    ``L = sum_i w_i (-logp(y_i|x_i)) / sum_i w_i n(y_i)``; then ``clip_grad_norm_`` to ``max_grad_norm``
    (``None`` disables it), ``optimizer.step()``, ``scheduler.step()`` and ``zero_grad``.

    Args:
        batch: a :class:`FinetuneBatch` (``[B, P + Ta]`` answers, ``[B, Tr]`` refusals) on the model's device.

    Returns a dict of detached tensors: ``loss`` (0-dim fp32), ``weights`` ``[B]``, ``d`` ``[B]``,
    ``completion_logprob`` and ``refusal_logprob`` ``[B]`` (length-normalised), ``num_tokens`` ``[B]`` and
    ``grad_norm`` (0-dim, before clipping).
    """
    if not isinstance(batch, FinetuneBatch):
        raise TypeError(f"batch must be a FinetuneBatch, got {type(batch).__name__}")
    _check_lm_batch(batch, "batch")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    _trainable(model)
    optimizer.zero_grad(set_to_none=True)
    # forward 1: (x, y), no grad
    with torch.no_grad():
        lp_y, n_y = sequence_logprobs(model, batch)
    # forward 2: (x, r), no grad, a full forward over prompt + refusal
    with torch.no_grad():
        lp_r, n_r = sequence_logprobs(model, batch.refusal_view())
    if bool((n_y == 0).any()) or bool((n_r == 0).any()):
        raise ValueError("every sample needs at least one answer token and one refusal token")
    comp = lp_y / n_y
    refu = lp_r / n_r
    d = comp - refu
    w = torch.softmax(d / tau, dim=0)
    # forward 3 + backward: (x, y) with grad
    lp, n = sequence_logprobs(model, batch)
    loss = (w * -lp).sum() / (w * n).sum()
    loss.backward()
    grad_norm = _clip_and_step(model, optimizer, max_grad_norm, scheduler)
    return {
        "loss": loss.detach(),
        "weights": w,
        "d": d,
        "completion_logprob": comp,
        "refusal_logprob": refu,
        "num_tokens": n_y,
        "grad_norm": grad_norm,
    }


def reference_sft_step(
    model: torch.nn.Module,
    batch: LMBatch,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float | None = 1.0,
    scheduler=None,
) -> dict[str, torch.Tensor]:
    """HF's own plain SFT step: ``model(..., labels=...).loss`` (token-mean CE), backward, clip, step.

    Returns ``{"loss": 0-dim, "grad_norm": 0-dim}`` (detached; grad norm before clipping).
    """
    _check_lm_batch(batch, "batch")
    _trainable(model)
    optimizer.zero_grad(set_to_none=True)
    loss = hf_loss(model, batch)
    loss.backward()
    grad_norm = _clip_and_step(model, optimizer, max_grad_norm, scheduler)
    return {"loss": loss.detach(), "grad_norm": grad_norm}


def _grads(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Per-parameter clones of the current grads (zeros where a parameter got no grad)."""
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()
    }


def _loss_and_grads(model: torch.nn.Module, batch: LMBatch, params: dict[str, torch.nn.Parameter]):
    """One forward/backward pass: HF's loss on ``batch`` and the clones of ``params``' grads after it."""
    loss = hf_loss(model, batch)
    loss.backward()
    return loss, _grads(params)


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=next(iter(a.values())).device)
    for n in a:
        total = total + (a[n].float() * b[n].float()).sum()
    return total


def reference_align_step(
    model: torch.nn.Module,
    batch: AlignBatch,
    optimizer: torch.optim.Optimizer,
    state: dict,
    *,
    rule: str = "cosine",
    eta: float = 5.0,
    rho: float = 0.1,
    lambda_ref: float = 0.05,
    momentum: float = 0.99,
    max_grad_norm: float | None = 1.0,
    scheduler=None,
) -> dict[str, torch.Tensor]:
    """One authors-style Antibody alignment step (docs/design.md §2.2): 5 forward/backward + a model copy.

    Passes: (1) ``g_h = grad L_H(theta)``; a ``copy.deepcopy`` of the model is perturbed to
    ``theta' = theta - rho g_h / (||g_h|| + 1e-7)``; (2) ``g_p = grad L_H(theta')`` and (3)
    ``g_r = grad L_R(theta')`` on the copy; the copy is dropped (the original is untouched: restore is exact);
    (4) ``g_a = grad L_A(theta)``; (5) ``L_H(theta)`` again for the sharpness ``L_H(theta) - L_H(theta')``,
    whose gradient is ``g_s = g_h - g_p``. Then ``lambda_raw = rule(g_a, g_s)``:

    * ``"cosine"``: ``max(eta - cos(g_a, g_s), 0)`` with ``cos = <g_a,g_s> / (||g_a|| ||g_s|| + 1e-8)``;
    * ``"kkt"``: ``max(eta - <g_a,g_s> / (||g_s||^2 + 1e-8), 0)``;
    * ``"constant"``: ``eta`` (Booster with ``lambda_ref=0``).

    ``lambda_t = momentum * lambda_{t-1} + (1 - momentum) * lambda_raw`` (initialised with the first
    ``lambda_raw``; ``momentum=0`` disables the EMA), ``delta = g_a + lambda_t g_s + lambda_ref g_r``, clipped
    to ``max_grad_norm`` with ``clip_grad_norm_`` and applied with ``optimizer.step()``.

    Args:
        batch: an :class:`AlignBatch` on the model's device.
        state: a dict updated in place: ``"lambda"`` (0-dim fp32 tensor, the EMA) and ``"step"`` (int).

    Returns a dict of detached tensors: ``lambda_raw``, ``lambda_t``, ``cos``, ``dot`` (``<g_a, g_s>``),
    ``loss_a``, ``loss_h``, ``loss_p`` (``L_H(theta')``), ``loss_r`` (``L_R(theta')``), ``grad_norm``
    (``||delta||`` before clipping).
    """
    if not isinstance(batch, AlignBatch):
        raise TypeError(f"batch must be an AlignBatch, got {type(batch).__name__}")
    for what in ("align", "harmful", "refusal"):
        _check_lm_batch(getattr(batch, what), f"batch.{what}")
    if rule not in ALIGN_RULES:
        raise ValueError(f"rule must be one of {ALIGN_RULES}, got {rule!r}")
    if not math.isfinite(float(eta)) or not math.isfinite(float(rho)) or not math.isfinite(float(lambda_ref)):
        raise ValueError(f"eta, rho and lambda_ref must be finite, got {eta}, {rho}, {lambda_ref}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    params = _trainable(model)

    # pass 1: g_h at theta
    model.zero_grad(set_to_none=True)
    loss_h, g_h = _loss_and_grads(model, batch.harmful, params)
    norm_h = torch.sqrt(_dot(g_h, g_h))

    # perturb a deep copy of the whole model (the authors' approach)
    perturbed = copy.deepcopy(model)
    perturbed.zero_grad(set_to_none=True)  # deepcopy copies .grad too
    pparams = {n: p for n, p in perturbed.named_parameters() if p.requires_grad}
    scale = rho / (norm_h + PERTURB_EPS)
    with torch.no_grad():
        for n, p in pparams.items():
            p.sub_((scale * g_h[n].float()).to(p.dtype))

    # pass 2: g_p = grad L_H(theta')
    loss_p, g_p = _loss_and_grads(perturbed, batch.harmful, pparams)
    perturbed.zero_grad(set_to_none=True)
    # pass 3: g_r = grad L_R(theta')
    loss_r, g_r = _loss_and_grads(perturbed, batch.refusal, pparams)
    del perturbed, pparams  # "restore": the original parameters were never touched

    # pass 4: g_a at theta
    model.zero_grad(set_to_none=True)
    loss_a, g_a = _loss_and_grads(model, batch.align, params)
    # pass 5: L_H at theta again, for the sharpness L_H(theta) - L_H(theta')
    model.zero_grad(set_to_none=True)
    loss_h2, g_h2 = _loss_and_grads(model, batch.harmful, params)
    model.zero_grad(set_to_none=True)
    g_s = {n: g_h2[n] - g_p[n] for n in params}

    dot = _dot(g_a, g_s)
    norm_a = torch.sqrt(_dot(g_a, g_a))
    sq_s = _dot(g_s, g_s)
    cos = dot / (norm_a * torch.sqrt(sq_s) + COS_EPS)
    if rule == "cosine":
        lam_raw = torch.clamp(eta - cos, min=0.0)
    elif rule == "kkt":
        lam_raw = torch.clamp(eta - dot / (sq_s + KKT_EPS), min=0.0)
    else:
        lam_raw = torch.full_like(dot, float(eta))
    prev = state.get("lambda")
    if prev is None or momentum == 0.0:
        lam = lam_raw
    else:
        lam = momentum * prev.to(lam_raw) + (1.0 - momentum) * lam_raw
    state["lambda"] = lam.detach().clone()
    state["step"] = int(state.get("step", 0)) + 1

    # delta = g_a + lambda_t g_s + lambda_ref g_r, written into .grad, clipped, applied
    for n, p in params.items():
        delta = g_a[n] + lam.to(g_a[n].dtype) * g_s[n]
        if lambda_ref != 0:
            delta = delta + lambda_ref * g_r[n]
        p.grad = delta
    grad_norm = _clip_and_step(model, optimizer, max_grad_norm, scheduler)
    return {
        "lambda_raw": lam_raw.detach(),
        "lambda_t": lam.detach(),
        "cos": cos.detach(),
        "dot": dot.detach(),
        "loss_a": loss_a.detach(),
        "loss_h": loss_h.detach(),
        "loss_p": loss_p.detach(),
        "loss_r": loss_r.detach(),
        "grad_norm": grad_norm,
    }
