"""Baseline defenses in the same lean loop: Vaccine (alignment stage) and Lisa (fine-tuning stage).

docs/design.md §2.3. Both optimise the same token-mean cross-entropy as :func:`antibody_fast.sft_step` (the fused
linear log-likelihood over answer rows, logits never materialised) so that their cost and results compare
fairly with SFT, Booster and Antibody. Each has a naive reference (HF's own loss, explicit Python loops) that the
tests hold them equal to.

* **Vaccine** (Huang et al. 2024): pass 1 records ``g_l = dL/d(output of attention block l)`` for every layer;
  the outputs are perturbed by ``e_l = rho * g_l / (||g||_global + 1e-7)`` (global L2 norm over all layers'
  gradients); pass 2, with the perturbation added, gives the gradient of the update. Pass 1 asks autograd for
  the attention-output gradients only, so it computes no parameter gradients.
* **Lisa** (Huang et al. 2024): bi-state optimisation. ``K_a`` steps on alignment data then ``K_f`` steps on
  user data, repeated; every step after the warm-up (``LisaConfig.warmup_fraction``) adds the proximal term ``rho_L / 2 * ||theta - theta_anchor||^2`` where the
  anchor is the trainable parameters at the last switch of state. The caller asks :meth:`LisaState.phase`
  which data the next step needs.

The steps have the shape of :mod:`antibody_fast.steps`: ``(model, batch, optimizer[, state], config, scheduler)``
with a config dataclass (:class:`VaccineConfig`, :class:`LisaConfig`; ``validate()`` raises on a bad option)
and a :class:`~antibody_fast.steps.StepStats` result (``clean_loss`` / ``perturbation_grad_norm`` for Vaccine,
``proximal`` for Lisa).

Under ``torch.distributed`` (e.g. ``torchrun``; default process group) both steps compute the global batch's
update: token counts, gradients (and Vaccine's ``||g||_global``) are summed over ranks, as in
:func:`antibody_fast.sft_step`. All steps take every ``requires_grad`` parameter of the model as the trainable
set, clip the global gradient norm to ``max_grad_norm`` (torch's ``clip_grad_norm_`` formula
``min(1, max / (norm + 1e-6))``), then call ``optimizer.step()``, ``scheduler.step()`` when given, and
``optimizer.zero_grad()``. Returned statistics are tensors (no host synchronisation inside a step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._model import (
    attention_output,
    find_attention_modules,
    flat_parameters,
    parts,
    replace_attention_output,
    trainable_params,
)
from ..data.batch import IGNORE_INDEX, LMBatch
from ..distributed import all_reduce_sum, is_distributed
from ..reference import hf_loss
from ._common import finish, global_loss_value, reduce_grads, start_guard, token_mean_loss
from ._validate import check_guard, checked_config
from .config import StepStats

__all__ = [
    "LisaConfig",
    "LisaState",
    "VaccineConfig",
    "find_attention_modules",
    "lisa_step",
    "reference_lisa_step",
    "reference_vaccine_step",
    "vaccine_step",
]


# -------------------------------------------------------------------------------------------------- helpers
def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = trainable_params(model)
    if not params:
        raise ValueError("the model has no trainable parameters (no parameter has requires_grad=True)")
    return params


def _check_max_grad_norm(max_grad_norm) -> None:
    if max_grad_norm is not None and not max_grad_norm >= 0:
        raise ValueError(f"max_grad_norm must be >= 0 or None, got {max_grad_norm}")


def _check_inputs(model: nn.Module, optimizer, batch: LMBatch, name: str = "batch") -> None:
    """The optimizer, the trainable parameters and the batch (type, shape, device, an answer token)."""
    if optimizer is None:
        raise ValueError("an optimizer is required")
    _trainable(model)
    if not isinstance(batch, LMBatch):
        raise TypeError(f"{name} must be an antibody_fast.data.LMBatch, got {type(batch).__name__}")
    if batch.input_ids.dim() != 2 or batch.input_ids.shape[0] == 0:
        raise ValueError(f"{name} is empty or not 2-D: input_ids has shape {tuple(batch.input_ids.shape)}")
    dev = next(model.parameters()).device
    if batch.input_ids.device != dev:
        raise ValueError(
            f"{name} is on {batch.input_ids.device} but the model is on {dev}; call batch.to(device)"
        )
    if batch.input_ids.device.type == "cpu" and not bool((batch.labels != IGNORE_INDEX).any()):
        # only validated on CPU: the check syncs
        raise ValueError(f"{name} has no answer token (every label is {IGNORE_INDEX})")


def _lm_loss(model: nn.Module, batch: LMBatch, impl: str = "auto") -> torch.Tensor:
    """Token-mean CE over answer tokens with the fused linear log-likelihood (0-d fp32 tensor): the same loss
    as :func:`antibody_fast.sft_step`."""
    loss, _ = token_mean_loss(parts(model), batch, impl, None, None, None)
    return loss


def _reference_update(params, optimizer, scheduler, max_grad_norm) -> torch.Tensor:
    """The references' Python-loop clip, then optimizer step, scheduler step, ``zero_grad``."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total = total + p.grad.detach().float().pow(2).sum()
    norm = torch.as_tensor(total).sqrt()
    if max_grad_norm:
        coef = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# --------------------------------------------------------------------------------------------------- Vaccine
@dataclass
class VaccineConfig:
    """Vaccine hyper-parameters.

    Attributes:
        rho: perturbation radius ``rho_V`` (the authors use 5 for LoRA on Llama-2).
        max_grad_norm: clip of the global gradient norm of pass 2 (``None``/0: no clipping).
        impl: implementation of the fused ops (``"auto"|"triton"|"cpp"|"torch"``).
        guard_nonfinite, max_consecutive_skips: the non-finite guard, as in
            :class:`~antibody_fast.FinetuneConfig` (a non-finite perturbation norm also skips the step).
    """

    rho: float = 5.0
    max_grad_norm: float | None = 1.0
    impl: str = "auto"
    guard_nonfinite: bool = True
    max_consecutive_skips: int | None = 10

    def validate(self) -> None:
        """Raise ``ValueError`` on a bad option."""
        _check_max_grad_norm(self.max_grad_norm)
        rho = self.rho
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0 <= rho < float("inf")):
            raise ValueError(f"rho must be a finite number >= 0, got {rho}")
        check_guard(self, None)


def vaccine_step(
    model: nn.Module,
    batch: LMBatch,
    optimizer: torch.optim.Optimizer,
    config: VaccineConfig | None = None,
    scheduler=None,
    *,
    attention_modules: Sequence[nn.Module] | None = None,
) -> StepStats:
    """One Vaccine alignment step (perturbation-aware alignment on the attention outputs).

    Args:
        model: HF causal LM (PEFT-wrapped or not); its ``requires_grad`` parameters are trained.
        batch: alignment data, an :class:`~antibody_fast.data.LMBatch` (``input_ids`` ``[B, T]`` int64 ...).
        optimizer: over the trainable parameters.
        config: :class:`VaccineConfig` (default ``VaccineConfig()``).
        scheduler: stepped after the optimizer when given.
        attention_modules: the blocks whose output is perturbed (default :func:`find_attention_modules`).

    Returns:
        :class:`~antibody_fast.steps.StepStats`: ``loss`` = the perturbed (pass-2) loss, ``grad_norm`` before
        clipping, ``clean_loss``, ``perturbation_grad_norm`` and ``skipped``.
    """
    config = checked_config(config, VaccineConfig, None)
    _check_inputs(model, optimizer, batch)
    modules = list(attention_modules) if attention_modules is not None else find_attention_modules(model)
    flat = flat_parameters(model)
    guard = start_guard(optimizer, flat, config, "vaccine_step")

    # pass 1: gradients w.r.t. the attention outputs only
    outputs: list[torch.Tensor] = []

    def record(_mod, _args, output):
        outputs.append(attention_output(output))

    handles = [m.register_forward_hook(record) for m in modules]
    try:
        clean_loss = _lm_loss(model, batch, config.impl)
    finally:
        for h in handles:
            h.remove()
    if len(outputs) != len(modules):
        raise RuntimeError(
            f"expected one output per attention block ({len(modules)}), recorded {len(outputs)} "
            "(gradient checkpointing re-runs forwards: disable it for Vaccine)"
        )
    grads = torch.autograd.grad(clean_loss, outputs, allow_unused=True)
    grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)]
    outputs.clear()  # the pass-1 graph can go
    gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    if is_distributed():  # ||g||_global over the global batch: every rank holds its samples' rows
        gnorm = all_reduce_sum(gnorm.square()).sqrt()
    scale = config.rho / (gnorm + 1e-7)
    perturb = [(g * scale.to(g.dtype)).detach() for g in grads]
    del grads

    # pass 2: the perturbed forward/backward gives the update gradient
    loss = _perturbed_loss(model, batch, modules, perturb, lambda: _lm_loss(model, batch, config.impl))
    loss.backward()
    flat.ensure_grad_views()  # no-op unless something replaced .grad (e.g. optimizer.zero_grad())
    reduce_grads(flat, None)  # under torchrun: the global batch's gradient (no-op in one process)
    loss_value = global_loss_value(loss, None)  # the same on every rank, so every rank skips alike
    with torch.no_grad():
        ok = torch.isfinite(gnorm) & torch.isfinite(loss_value)
    norm, skipped = finish(flat, optimizer, scheduler, config, guard, ok)
    return StepStats(
        loss=loss_value,
        grad_norm=norm,
        skipped=skipped,
        clean_loss=global_loss_value(clean_loss, None),
        perturbation_grad_norm=gnorm.detach(),
    )


def _perturbed_loss(model, batch, modules, perturb, loss_fn) -> torch.Tensor:
    """``loss_fn()`` with ``perturb[i]`` added to the output of attention block ``modules[i]``."""

    def add(i):
        def hook(_mod, _args, output):
            return replace_attention_output(output, attention_output(output) + perturb[i])

        return hook

    handles = [m.register_forward_hook(add(i)) for i, m in enumerate(modules)]
    try:
        return loss_fn()
    finally:
        for h in handles:
            h.remove()


def reference_vaccine_step(
    model: nn.Module,
    batch: LMBatch,
    optimizer: torch.optim.Optimizer,
    config: VaccineConfig | None = None,
    scheduler=None,
    *,
    attention_modules: Sequence[nn.Module] | None = None,
) -> StepStats:
    """Naive Vaccine: HF's loss, ``retain_grad`` on every attention output and a full backward in pass 1
    (parameter grads computed then thrown away), per-tensor Python loops for the norms and the clip.
    Same arguments and result as :func:`vaccine_step` (``impl`` and the guard options are not used; no
    ``skipped``); the tests' oracle."""
    config = VaccineConfig() if config is None else config
    params = _trainable(model)
    modules = list(attention_modules) if attention_modules is not None else find_attention_modules(model)
    store: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(_mod, _args, output):
            t = attention_output(output)
            t.retain_grad()
            store[i] = t

        return hook

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    clean_loss = hf_loss(model, batch)
    for h in handles:
        h.remove()
    clean_loss.backward()
    grads = {}
    for i in range(len(modules)):
        g = store[i].grad
        grads[i] = torch.zeros_like(store[i]) if g is None else g.detach().clone()
    for p in params:
        p.grad = None
    total = torch.zeros((), dtype=torch.float32, device=clean_loss.device)
    for i in grads:
        total = total + grads[i].float().pow(2).sum()
    gnorm = total.sqrt()
    eps = {i: grads[i] * (config.rho / (gnorm + 1e-7)) for i in grads}
    loss = _perturbed_loss(model, batch, modules, eps, lambda: hf_loss(model, batch))
    loss.backward()
    norm = _reference_update(params, optimizer, scheduler, config.max_grad_norm)
    return StepStats(
        loss=loss.detach(),
        grad_norm=norm,
        clean_loss=clean_loss.detach(),
        perturbation_grad_norm=gnorm.detach(),
    )


# ------------------------------------------------------------------------------------------------------ Lisa
@dataclass
class LisaConfig:
    """Lisa hyper-parameters.

    Attributes:
        align_steps: ``K_a``, steps of each alignment state (authors: 100).
        finetune_steps: ``K_f``, steps of each fine-tuning state (authors: 900).
        rho: ``rho_L``, weight of the proximal term ``rho_L / 2 * ||theta - theta_anchor||^2`` (authors: 0.01).
        max_grad_norm: clip of the global gradient norm (proximal gradient included); ``None``/0 disables it.
        first_phase: ``"align"`` (default) or ``"finetune"``: the state of step 0.
        warmup_fraction: the authors' warm-up: the proximal term is off while
            ``step <= warmup_fraction * total_steps`` (``step`` = the 0-based index of the step being taken, as
            HF's ``state.global_step`` reads inside ``training_step``). Authors: 0.1.
        total_steps: the run's total step count, which the warm-up needs. ``None`` (the default for library
            callers that do not know it) turns the warm-up off; the CLI and the demo pass it.
        impl: implementation of the fused ops (``"auto"|"triton"|"cpp"|"torch"``).
        guard_nonfinite, max_consecutive_skips: the non-finite guard, as in :class:`~antibody_fast.FinetuneConfig`.
    """

    align_steps: int = 100
    finetune_steps: int = 900
    rho: float = 0.01
    max_grad_norm: float | None = 1.0
    first_phase: str = "align"
    warmup_fraction: float = 0.1
    total_steps: int | None = None
    impl: str = "auto"
    guard_nonfinite: bool = True
    max_consecutive_skips: int | None = 10

    def proximal_on(self, step: int) -> bool:
        """Whether step ``step`` (0-based) adds the proximal term: off during the authors' warm-up."""
        if self.total_steps is None:
            return True
        return step > self.warmup_fraction * self.total_steps

    def validate(self) -> None:
        """Raise ``ValueError`` on a bad option."""
        if self.align_steps < 0 or self.finetune_steps < 0 or self.align_steps + self.finetune_steps == 0:
            raise ValueError(
                f"align_steps and finetune_steps must be >= 0 with a positive sum, got "
                f"{self.align_steps} and {self.finetune_steps}"
            )
        if not (0 <= self.rho < float("inf")):
            raise ValueError(f"rho must be a finite number >= 0, got {self.rho}")
        check_guard(self, None)
        if self.first_phase not in ("align", "finetune"):
            raise ValueError(f"first_phase must be 'align' or 'finetune', got {self.first_phase!r}")
        _check_max_grad_norm(self.max_grad_norm)
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if self.total_steps is not None and not (isinstance(self.total_steps, int) and self.total_steps >= 1):
            raise ValueError(f"total_steps must be a positive int or None, got {self.total_steps!r}")


@dataclass
class LisaState:
    """Lisa's training state: the step count and the anchor (trainable parameters at the last state switch).

    ``anchor`` is ``None`` until the first step. :func:`lisa_step` keeps it flat: one 1-D tensor per dtype group
    of the model's :class:`~antibody_fast.flat.FlatParameters` (``flat.unflatten(anchor)`` gives the
    per-parameter views); :func:`reference_lisa_step` keeps one tensor per trainable parameter.
    :meth:`state_dict` / :meth:`load_state_dict` serialise it with checkpoints.
    """

    step: int = 0
    anchor: list[torch.Tensor] | None = None

    def phase(self, config: LisaConfig, step: int | None = None) -> str:
        """``"align"`` or ``"finetune"``: which data step ``step`` (default: the next step) trains on."""
        s = self.step if step is None else step
        ka, kf = config.align_steps, config.finetune_steps
        first, second = (ka, kf) if config.first_phase == "align" else (kf, ka)
        names = ("align", "finetune") if config.first_phase == "align" else ("finetune", "align")
        return names[0] if s % (first + second) < first else names[1]

    def is_switch(self, config: LisaConfig) -> bool:
        """Whether the next step starts a new state (the anchor is re-taken before it)."""
        return (
            self.anchor is None or self.step == 0 or self.phase(config, self.step - 1) != self.phase(config)
        )

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "anchor": None if self.anchor is None else [a.clone() for a in self.anchor],
        }

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.anchor = None if sd["anchor"] is None else [a.clone() for a in sd["anchor"]]


def _check_lisa(model, batch, optimizer, state, config):
    if not isinstance(state, LisaState):
        raise TypeError(f"state must be a LisaState, got {type(state).__name__}")
    config = checked_config(config, LisaConfig, None)
    _check_inputs(model, optimizer, batch)
    flat = flat_parameters(model)
    bufs = flat.param_buffers
    if state.anchor is not None:
        ok = len(state.anchor) == len(bufs) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            for a, b in zip(state.anchor, bufs)
        )
        if not ok:
            raise ValueError(
                "state.anchor does not match the model's flat trainable parameters (shapes "
                f"{[tuple(a.shape) for a in state.anchor]} vs {[tuple(b.shape) for b in bufs]})"
            )
    return config, flat


def lisa_step(
    model: nn.Module,
    batch: LMBatch,
    optimizer: torch.optim.Optimizer,
    state: LisaState,
    config: LisaConfig | None = None,
    scheduler=None,
) -> StepStats:
    """One Lisa step on ``batch``: alignment data when ``state.phase(config) == "align"``, user data otherwise.

    Loss = token-mean CE (fused, as :func:`antibody_fast.sft_step`) + ``rho/2 * ||theta - anchor||^2``. The
    proximal gradient ``rho * (theta - anchor)`` is added to the flat gradient buffer in one fused op (no autograd
    graph over the parameters); clipping is the fused flat clip. At a state switch the anchor is re-taken (copied
    in place into the flat anchor).

    Args:
        model: HF causal LM; its ``requires_grad`` parameters are trained.
        batch: :class:`~antibody_fast.data.LMBatch` (``input_ids`` ``[B, T]`` int64 ...) of the current state.
        optimizer: over the trainable parameters.
        state: :class:`LisaState`, advanced by one step.
        config: :class:`LisaConfig` (default ``LisaConfig()``).
        scheduler: stepped after the optimizer when given.

    During the authors' warm-up (``config.proximal_on(state.step)`` false: the first ``warmup_fraction`` of
    ``total_steps``) the proximal term is off and the step is plain SFT on the current state's data.

    Returns:
        :class:`~antibody_fast.steps.StepStats` with ``loss``, ``grad_norm``, ``skipped`` and ``proximal``, the
        proximal term's value before the update (0 during the warm-up).
    """
    config, flat = _check_lisa(model, batch, optimizer, state, config)
    guard = start_guard(optimizer, flat, config, "lisa_step")
    from ..ops.flat_ops import antibody_combine_, grad_dots

    impl = config.impl
    theta = flat.param_buffers
    if state.anchor is None:
        state.anchor = [t.detach().clone() for t in theta]
    elif state.is_switch(config):
        with torch.no_grad():
            torch._foreach_copy_(state.anchor, theta)
    rho = float(config.rho) if config.proximal_on(state.step) else 0.0  # host ints only: no sync
    loss = _lm_loss(model, batch, impl)
    loss.backward()
    flat.ensure_grad_views()
    # under torchrun: the global batch's gradient, before the (rank-equal) proximal one
    reduce_grads(flat, None)
    grads = flat.grad_buffers
    with torch.no_grad():
        # ||theta - anchor||^2 is the third of grad_dots(g, theta, anchor) (one fused pass, no temporary), and
        # the proximal gradient g += rho * (theta - anchor) is antibody_combine_ with lambda_t = rho.
        prox = 0.5 * rho * grad_dots(grads, theta, state.anchor, group=flat.shard_group, impl=impl)[2]
        if rho:
            antibody_combine_(grads, grads, theta, state.anchor, None, rho, 0.0, impl=impl)
    loss_value = global_loss_value(loss, None)  # the same on every rank, so every rank skips alike
    with torch.no_grad():
        ok = torch.isfinite(loss_value) & torch.isfinite(prox)
    norm, skipped = finish(flat, optimizer, scheduler, config, guard, ok)
    state.step += 1
    return StepStats(loss=loss_value, grad_norm=norm, skipped=skipped, proximal=prox)


def reference_lisa_step(
    model: nn.Module,
    batch: LMBatch,
    optimizer: torch.optim.Optimizer,
    state: LisaState,
    config: LisaConfig | None = None,
    scheduler=None,
) -> StepStats:
    """Naive Lisa: HF's loss plus the proximal term written into the autograd graph, parameter by parameter,
    and a Python-loop clip. Same arguments and result as :func:`lisa_step` (no ``skipped``); the tests'
    oracle."""
    config = LisaConfig() if config is None else config
    params = _trainable(model)
    phase_now = state.phase(config)
    switched = state.step == 0 or state.anchor is None or state.phase(config, state.step - 1) != phase_now
    if switched:
        state.anchor = [p.detach().clone() for p in params]
    loss = hf_loss(model, batch)
    prox = torch.zeros((), dtype=torch.float32, device=loss.device)
    for p, a in zip(params, state.anchor):
        prox = prox + ((p - a) ** 2).sum()
    prox = (config.rho if config.proximal_on(state.step) else 0.0) / 2 * prox
    (loss + prox).backward()
    norm = _reference_update(params, optimizer, scheduler, config.max_grad_norm)
    state.step += 1
    return StepStats(loss=loss.detach(), grad_norm=norm, proximal=prox.detach())
