"""The lean training steps: ``weighted_step`` (fine-tuning stage), ``align_step`` (alignment stage) and
``sft_step`` (the plain token-mean SFT baseline). docs/design.md §2.1, §2.2 and §3.

Every step takes an HF causal LM (PEFT-wrapped or not, optionally wrapped in ``DistributedDataParallel``),
a prompt-aligned batch (:mod:`antibody_fast.data.batch`) and a torch optimizer built on the model's
parameters, and performs one optimizer update. The model is split once into its trunk (the decoder that
returns the final hidden state), its lm_head and the logit soft-cap (:func:`antibody_fast.models.get_trunk_and_head`);
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
  that must read data (zero-token answers or refusals) runs only when ``config.validate_data`` is true, which by
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

Layout: :mod:`.config` (configs, :class:`AlignState`, :class:`StepStats`), :mod:`.finetune` (``weighted_step``,
``sft_step``), :mod:`.align` (``align_step``), ``_common`` (the token-mean loss and the guarded finish, shared
with :mod:`.baselines`) and ``_validate`` (the checks run before any state change). The model
plumbing (trunk/head split, flat parameters) lives in :mod:`antibody_fast._model`.
"""

from __future__ import annotations

from .._model import flat_parameters
from .align import align_step
from .config import LAMBDA_RULES, REFUSAL_SCORING, AlignConfig, AlignState, FinetuneConfig, StepStats
from .finetune import sft_step, weighted_step

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
