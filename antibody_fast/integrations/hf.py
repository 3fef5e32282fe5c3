"""``transformers.Trainer`` subclasses whose update is the lean Antibody step.

* :class:`AntibodyFinetuneTrainer`: each optimizer step is one :func:`antibody_fast.weighted_step` on the
  accumulated micro-batches (docs/design.md §2.1).
* :class:`AntibodyAlignmentTrainer`: each optimizer step is one :func:`antibody_fast.align_step` (docs/design.md §2.2);
  :class:`BoosterTrainer` is the same trainer with ``AlignConfig(rule="constant", lambda_ref=0)``.

Datasets hold examples ``{"prompt": str | list[int], "response": str | list[int], "index": int (optional;
added from the position when missing), "is_harmful": bool (optional, reports only)}`` -- e.g. the output of
:mod:`antibody_fast.data.loaders`. Text needs ``processing_class=`` (the tokenizer); token ids need none.

How the Trainer machinery is respected:

* **Gradient accumulation**: micro-batches are buffered until the accumulation boundary (accelerate's
  ``sync_gradients``), then handed to the step together. ``weighted_step`` computes each micro-batch's
  weighted loss on its own -- weights normalised per micro-batch (the authors' behaviour) -- and divides by
  the number of micro-batches; the Antibody loss has its own normaliser ``Σ w_i n(y_i)``, so HF's
  ``num_items_in_batch`` (a plain token count) is not used by it. ``align_step`` takes one batch: the
  micro-batches of an accumulation window are concatenated (each loss is then the token mean over the whole
  window, which is exactly HF's ``num_items_in_batch`` normalisation; the memory is that of the full batch).
* **Optimizer, clipping, LR scheduler**: the step clips (fused, ``args.max_grad_norm``; 0 disables) and calls
  the Trainer's optimizer; the Trainer then steps its LR scheduler as usual. The Trainer's own
  ``optimizer.step()`` call that follows is skipped for that step (the update was already applied) and its
  gradient clipping reports the step's norm instead of clipping again.
* **DDP through accelerate**: the steps unwrap the DDP module, take the softmax over the global batch and
  all-reduce the flat gradients themselves.
* **Mixed precision**: ``args.bf16`` runs the step under bf16 autocast (``config.amp_dtype``); fp16 needs a
  grad scaler the steps do not use and is rejected.
* **remove_unused_columns**: the ``prompt``/``response``/``index``/``is_harmful`` columns (which the model's
  forward does not take) are kept.
* **Logging**: every log line adds the means since the previous log of ``weight_harmful`` / ``weight_benign``
  (when flags exist), ``weight_min`` / ``weight_max`` and ``d_mean`` (fine-tuning), or ``lambda_t``, ``cos``
  and the four losses (alignment).
* **Checkpoints**: the alignment trainer saves :class:`~antibody_fast.steps.AlignState` (λ EMA, step count)
  next to the optimizer (``antibody_align_state.pt``) and restores it with ``resume_from_checkpoint``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from transformers import Trainer

from .._model import trainable_params
from ..data import AlignBatch, AlignCollator, FinetuneCollator
from ..steps import AlignConfig, AlignState, FinetuneConfig, align_step, weighted_step

__all__ = ["AntibodyFinetuneTrainer", "AntibodyAlignmentTrainer", "BoosterTrainer", "ANTIBODY_COLUMNS"]

ANTIBODY_COLUMNS = ("prompt", "response", "index", "is_harmful")
_KEY = "antibody_batch"
_ALIGN_STATE_FILE = "antibody_align_state.pt"
# StepStats fields of align_step logged (means since the previous log line) by AntibodyAlignmentTrainer
_ALIGN_LOG_KEYS = (
    "lambda_t",
    "lambda_raw",
    "cos",
    "loss_align",
    "loss_harmful",
    "loss_perturbed",
    "loss_refusal",
)


# ----------------------------------------------------------------------------------------------- datasets
class _IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset of dicts with ``"index"`` = position added where missing."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        ex = self.base[i]
        if "index" not in ex:
            ex = {**ex, "index": i}
        return ex


def _with_index(dataset):
    if dataset is None:
        return None
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            if "index" in dataset.column_names:
                return dataset
            return dataset.add_column("index", list(range(len(dataset))))
    except ImportError:
        pass
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return dataset
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"expected a map-style dataset of example dicts, got {type(dataset).__name__}")
    return _IndexedDataset(dataset)


def _as_dict(batch, extra: Any) -> dict:
    """What the Trainer sees: the tensors it inspects (tokens seen, label counts, FLOPs) plus the batch."""
    lm = batch.align if isinstance(batch, AlignBatch) else batch
    return {"input_ids": lm.input_ids, "attention_mask": lm.attention_mask, "labels": lm.labels, _KEY: extra}


class _FinetuneDataCollator:
    def __init__(self, collator: FinetuneCollator):
        self.collator = collator

    def __call__(self, features: Sequence[dict]) -> dict:
        batch = self.collator(list(features))
        return _as_dict(batch, batch)


class _AlignDataCollator:
    """Collates alignment examples A and pairs each with a harmful example H (fixed, seeded pairing by the A
    example's ``index``: ``H = harmful[perm[index mod len(harmful)]]``), so that the H stream does not depend
    on the DataLoader's state and survives a resume."""

    def __init__(self, collator: AlignCollator, harmful_dataset, seed: int):
        if harmful_dataset is None or len(harmful_dataset) == 0:
            raise ValueError("AntibodyAlignmentTrainer: harmful_dataset is required and must not be empty")
        self.collator = collator
        self.harmful = harmful_dataset
        self.perm = list(range(len(harmful_dataset)))
        random.Random(seed).shuffle(self.perm)

    def examples(self, features: Sequence[dict]) -> tuple[list[dict], list[dict]]:
        align, harmful = [], []
        for f in features:
            align.append(dict(f))
            j = self.perm[int(f["index"]) % len(self.perm)]
            h = dict(self.harmful[j])
            h["index"] = j
            harmful.append(h)
        return align, harmful

    def __call__(self, features: Sequence[dict]) -> dict:
        align, harmful = self.examples(features)
        batch = self.collator(align, harmful)
        return _as_dict(batch, (batch, align, harmful))


# ----------------------------------------------------------------------------------------------- trainers
class _AntibodyTrainerMixin:
    """Shared plumbing: column keeping, the optimizer-step guard, clipping report, logging of step stats."""

    _LOG_KEYS: tuple[str, ...] = ()

    def _antibody_init(self) -> None:
        if self.args.fp16:
            raise ValueError(
                f"{type(self).__name__}: fp16 mixed precision needs a grad scaler that the Antibody steps do not "
                "use; train with bf16=True or in fp32"
            )
        self._ab_pending: list = []
        self._ab_skip_optimizer_step = False
        self._ab_grad_norm = None
        self._ab_sums: dict[str, torch.Tensor] = {}
        self._ab_counts: dict[str, torch.Tensor] = {}

    @staticmethod
    def _refuse_data_collator(kwargs: dict, trainer: str) -> None:
        """The trainers build their own data collator: a given one raises, ``data_collator=None`` is dropped."""
        if kwargs.get("data_collator") is not None:
            raise ValueError(f"{trainer} builds its own data collator; do not pass data_collator")
        kwargs.pop("data_collator", None)

    def _init_trainer(
        self, model, args, train_dataset, processing_class, data_collator, kwargs: dict
    ) -> None:
        """The Trainer's ``__init__`` with the Antibody data collator and indexed dataset, then the checks."""
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=_with_index(train_dataset),
            processing_class=processing_class,
            **kwargs,
        )
        self._antibody_init()

    # ---- columns: keep the Antibody fields despite remove_unused_columns
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for c in ANTIBODY_COLUMNS:
            if c not in self._signature_columns:
                self._signature_columns.append(c)

    # ---- the step applies the update itself; the Trainer's following optimizer.step() is skipped once
    def _inner_optimizer(self) -> torch.optim.Optimizer:
        opt = self.optimizer
        inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch optimizer
        if not getattr(inner, "_antibody_guarded", False):
            real_step = inner.step
            trainer = self

            def step(*args, **kwargs):
                if trainer._ab_skip_optimizer_step:
                    trainer._ab_skip_optimizer_step = False
                    return None
                return real_step(*args, **kwargs)

            inner.step = step
            inner._antibody_guarded = True
        return inner

    def _clip_grad_norm(self, model):
        # the step already clipped (fused) and applied the update; report its pre-clip norm
        return self._ab_grad_norm

    def _get_grad_norm(self, model, grad_norm=None):
        return self._ab_grad_norm if grad_norm is None else grad_norm

    def _amp_dtype(self):
        return torch.bfloat16 if self.args.bf16 else None

    def _max_grad_norm(self):
        return (
            float(self.args.max_grad_norm)
            if self.args.max_grad_norm and self.args.max_grad_norm > 0
            else None
        )

    def _device(self) -> torch.device:
        params = trainable_params(self.model)
        return params[0].device if params else self.args.device

    def _collect(self, inputs) -> Any | None:
        """Buffer a micro-batch; return the buffered list at the accumulation boundary, else None."""
        if not isinstance(inputs, dict) or _KEY not in inputs:
            raise ValueError(
                f"{type(self).__name__}: the batch does not come from the Antibody data collator (no {_KEY!r}); "
                "do not pass a custom data_collator"
            )
        self._ab_pending.append(inputs[_KEY])
        if not self.accelerator.sync_gradients:
            return None
        pending, self._ab_pending = self._ab_pending, []
        return pending

    def _stepped(self, stats, values: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """After a step that applied the update itself: skip the Trainer's next ``optimizer.step()``, record
        ``values`` for the log and return the loss the Trainer expects."""
        self._ab_skip_optimizer_step = True
        self._record(stats.grad_norm, values)
        return stats.loss.detach().to(self.args.device)

    def _record(self, grad_norm: torch.Tensor, values: dict[str, torch.Tensor | None]) -> None:
        """Accumulate a step's 0-dim log values (device tensors; ``None`` ones skipped) until the next log."""
        for k, v in values.items():
            if v is None:
                continue
            v = v.detach().float()
            if v.dim() > 0:
                continue
            ok = ~torch.isnan(v)  # a batch without harmful (or benign) samples gives NaN: not counted
            self._ab_sums[k] = self._ab_sums.get(k, 0) + torch.where(ok, v, torch.zeros_like(v))
            self._ab_counts[k] = self._ab_counts.get(k, 0) + ok.float()
        self._ab_grad_norm = grad_norm.detach()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._ab_sums and "loss" in logs:  # training log line: add the step statistics (one host sync)
            keys = list(self._ab_sums)
            values = torch.stack([self._ab_sums[k] / self._ab_counts[k] for k in keys]).cpu().tolist()
            for k, v in zip(keys, values):
                logs[k] = None if v != v else v  # NaN: no sample of that kind since the last log
            self._ab_sums, self._ab_counts = {}, {}
        if isinstance(logs.get("grad_norm"), torch.Tensor):
            logs["grad_norm"] = logs["grad_norm"].item()
        super().log(logs, *args, **kwargs)

    def floating_point_ops(self, inputs) -> int:
        try:
            return super().floating_point_ops({k: v for k, v in inputs.items() if k != _KEY})
        except Exception:
            return 0


class AntibodyFinetuneTrainer(_AntibodyTrainerMixin, Trainer):
    """HF ``Trainer`` for the fine-tuning stage: each optimizer step is :func:`antibody_fast.weighted_step`.

    Args:
        model: HF causal LM (PEFT-wrapped or not).
        args: ``TrainingArguments`` (``max_grad_norm``, ``gradient_accumulation_steps``, LR schedule, ``bf16``
            ... are honoured as described in the module docstring).
        train_dataset: map-style dataset (list, torch Dataset or ``datasets.Dataset``) of user examples.
        processing_class: the tokenizer (needed for text examples and the default text refusal pool).
        finetune_config: :class:`~antibody_fast.FinetuneConfig` (``tau``, ``refusal_scoring``, ``impl`` ...);
            its ``max_grad_norm`` and ``amp_dtype`` are taken from ``args``.
        refusals, max_length: passed to :class:`~antibody_fast.data.FinetuneCollator`.
        **kwargs: the other ``Trainer`` arguments (``eval_dataset``, ``callbacks``, ``optimizers`` ...). A custom
            ``data_collator`` is not supported.

    Logs, in addition to the loss: ``weight_harmful`` / ``weight_benign`` (mean weight of flagged harmful /
    benign samples, when the data has ``is_harmful``), ``weight_min``, ``weight_max``, ``d_mean``.
    """

    def __init__(
        self,
        model=None,
        args=None,
        train_dataset=None,
        *,
        processing_class=None,
        finetune_config: FinetuneConfig | None = None,
        refusals=None,
        max_length: int = 512,
        **kwargs,
    ):
        self._refuse_data_collator(kwargs, "AntibodyFinetuneTrainer")
        self.finetune_config = FinetuneConfig() if finetune_config is None else finetune_config
        if not isinstance(self.finetune_config, FinetuneConfig):
            raise TypeError(f"finetune_config must be a FinetuneConfig, got {type(finetune_config).__name__}")
        self.finetune_config.validate()
        collator = FinetuneCollator(
            processing_class, refusals=refusals, max_length=max_length, pad_token_id=None
        )
        self._init_trainer(
            model, args, train_dataset, processing_class, _FinetuneDataCollator(collator), kwargs
        )

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        pending = self._collect(inputs)
        if pending is None:
            return torch.zeros((), device=self.args.device)
        model.train()
        device = self._device()
        batches = [b.to(device) for b in pending]
        config = replace(
            self.finetune_config, max_grad_norm=self._max_grad_norm(), amp_dtype=self._amp_dtype()
        )
        stats = weighted_step(
            model, batches[0] if len(batches) == 1 else batches, self._inner_optimizer(), config
        )
        w = stats.weights.detach()
        return self._stepped(
            stats,
            {
                "weight_harmful": stats.harmful_weight,
                "weight_benign": stats.benign_weight,
                "weight_min": w.min(),
                "weight_max": w.max(),
                "d_mean": stats.d.detach().mean(),
            },
        )


class AntibodyAlignmentTrainer(_AntibodyTrainerMixin, Trainer):
    """HF ``Trainer`` for the alignment stage: each optimizer step is :func:`antibody_fast.align_step`.

    Args:
        model: HF causal LM (PEFT-wrapped or not).
        args: ``TrainingArguments`` (see the module docstring).
        train_dataset: the alignment data A (harmful prompt -> refusal answer) as example dicts.
        harmful_dataset: the harmful data H (harmful prompt -> harmful answer) as example dicts. Each A example
            is paired with ``harmful_dataset[perm[index mod len(harmful_dataset)]]`` (``perm`` a shuffle seeded
            with ``harmful_seed``, default ``args.seed``); the refusal view R uses the pool entry of the H index.
        processing_class: the tokenizer (for text examples and the default text refusal pool).
        align_config: :class:`~antibody_fast.AlignConfig` (``rule``, ``eta``, ``rho``, ``lambda_ref``,
            ``momentum``, ``impl``); ``max_grad_norm`` and ``amp_dtype`` come from ``args``.
        refusals, max_length: passed to :class:`~antibody_fast.data.AlignCollator`.

    ``self.align_state`` (:class:`~antibody_fast.AlignState`) holds the λ EMA; it is saved with the Trainer's
    checkpoints. Logs ``lambda_t``, ``lambda_raw``, ``cos`` and the four losses.
    """

    default_align_config: dict[str, Any] = {}

    def __init__(
        self,
        model=None,
        args=None,
        train_dataset=None,
        harmful_dataset=None,
        *,
        processing_class=None,
        align_config: AlignConfig | None = None,
        refusals=None,
        max_length: int = 512,
        harmful_seed: int | None = None,
        **kwargs,
    ):
        self._refuse_data_collator(kwargs, type(self).__name__)
        self.align_config = AlignConfig(**self.default_align_config) if align_config is None else align_config
        if not isinstance(self.align_config, AlignConfig):
            raise TypeError(f"align_config must be an AlignConfig, got {type(align_config).__name__}")
        self.align_config.validate()
        self.align_state = AlignState()
        collator = AlignCollator(
            processing_class, refusals=refusals, max_length=max_length, pad_token_id=None
        )
        seed = harmful_seed if harmful_seed is not None else (args.seed if args is not None else 42)
        self._align_collator = _AlignDataCollator(collator, harmful_dataset, seed)
        self._init_trainer(model, args, train_dataset, processing_class, self._align_collator, kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        pending = self._collect(inputs)
        if pending is None:
            return torch.zeros((), device=self.args.device)
        model.train()
        if len(pending) == 1:
            batch = pending[0][0]
        else:  # gradient accumulation: one align_step on the concatenated window
            align = [ex for _, a, _ in pending for ex in a]
            harmful = [ex for _, _, h in pending for ex in h]
            batch = self._align_collator.collator(align, harmful)
        batch = batch.to(self._device())
        config = replace(self.align_config, max_grad_norm=self._max_grad_norm(), amp_dtype=self._amp_dtype())
        stats = align_step(model, batch, self._inner_optimizer(), self.align_state, config)
        return self._stepped(stats, {k: getattr(stats, k) for k in _ALIGN_LOG_KEYS})

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.align_state.state_dict(), os.path.join(output_dir, _ALIGN_STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, _ALIGN_STATE_FILE)
        if os.path.isfile(path):
            self.align_state.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class BoosterTrainer(AntibodyAlignmentTrainer):
    """Booster (the alignment baseline): :class:`AntibodyAlignmentTrainer` with
    ``AlignConfig(rule="constant", lambda_ref=0.0)`` by default (λ = η, no refusal pass)."""

    default_align_config = {"rule": "constant", "lambda_ref": 0.0}
