"""``antibody-fast finetune``: the fine-tuning stage on a poisoned user set.

``--method antibody`` runs :func:`~antibody_fast.weighted_step` (docs/design.md §2.1) and records every
sample's weight, summed over ranks, for the suppression report; ``sft`` runs plain SFT; ``lisa``
(:func:`~antibody_fast.baselines.lisa_step`, docs/design.md §2.3) alternates ``--lisa-align-steps`` steps on
``--align-data`` with ``--lisa-finetune-steps`` on the user data, each state's data continuing where its
previous state stopped.
"""

from __future__ import annotations

import math
import os

import torch

from ..baselines import LisaConfig, LisaState, lisa_step
from ..data import AlignCollator, FinetuneCollator
from ..data.loaders import build_poisoned_set, load_alignment, load_harmful, load_task
from ..distributed import all_reduce_sum
from ..steps import FinetuneConfig, sft_step, weighted_step
from .console import CLIError, say
from .inputs import collator_args, kept, order, precheck, refusal_pool, templated
from .loading import adapter_mode, load_model
from .loop import LoggedStats, TrainLoop, make_optimizer
from .options import FinetuneOptions
from .outputs import suppression_outputs
from .runtime import WORLD, amp_dtype, distribute_model, training_device

__all__ = ["FinetuneRun", "run_finetune", "phase_steps_before"]

_CHUNK = 64  # samples per collator pre-check


def phase_steps_before(cfg, step: int, phase: str) -> int:
    """How many of Lisa's steps ``0 .. step-1`` are in ``phase`` (``LisaState.phase``'s alternation), so that
    each state's data continues where its previous state stopped."""
    first = cfg.align_steps if cfg.first_phase == "align" else cfg.finetune_steps
    cycles, rem = divmod(step, cfg.align_steps + cfg.finetune_steps)
    n_first = cycles * first + min(rem, first)
    return n_first if phase == cfg.first_phase else step - n_first


class FinetuneRun(TrainLoop):
    """One ``finetune`` run: builds the poisoned user set, loads the model (continuing or merging the
    alignment adapter), the optimizer and (``--resume``) the checkpoint with the per-sample weight sums; the
    steps of ``--method``."""

    def __init__(self, opts: FinetuneOptions, sources: dict):
        super().__init__(opts, sources)
        self.method = method = opts.method
        self.antibody, self.lisa = method == "antibody", method == "lisa"
        lisa = self.lisa
        task = load_task(opts.task, opts.task_data)
        harmful = load_harmful(opts.harmful_data) if opts.harmful_ratio > 0 else []
        try:
            self.examples = examples = build_poisoned_set(
                task, harmful, n=opts.num_samples, harmful_ratio=opts.harmful_ratio, seed=opts.seed
            )
        except ValueError as e:
            raise CLIError(str(e)) from None
        align = templated(load_alignment(opts.align_data, limit=opts.num_align), opts) if lisa else []
        refusals = refusal_pool(opts)
        self.adapter_mode, self.adapter_why = adapter_mode(opts, sources)
        self.device = device = training_device(opts)
        amp = amp_dtype(opts, device)

        self.config = FinetuneConfig(
            tau=opts.tau,
            max_grad_norm=opts.max_grad_norm or None,
            refusal_scoring=opts.refusal_scoring,
            amp_dtype=amp,
            impl=opts.impl,
        )
        self.config.validate()
        self.model, tokenizer = load_model(opts, device, train=True, adapter_mode=self.adapter_mode)
        self.collator = FinetuneCollator(**collator_args(opts, tokenizer, refusals))
        self.align_collator = AlignCollator(**collator_args(opts, tokenizer, refusals)) if lisa else None
        self.kept, self.align = self._filtered(examples, align)
        # the report covers every sample; training samples the kept ones
        n_all, n = len(examples), len(self.kept)
        self.batch_size = min(opts.batch_size, n)
        self.global_batch = self.batch_size * WORLD.size
        self.total = total = opts.resolve_steps(n, self.global_batch)
        self.lisa_config = self.lisa_state = None
        if lisa:
            self.lisa_config = LisaConfig(
                align_steps=opts.lisa_align_steps,
                finetune_steps=opts.lisa_finetune_steps,
                rho=opts.lisa_rho,
                max_grad_norm=opts.max_grad_norm or None,
                warmup_fraction=opts.lisa_warmup_fraction,
                total_steps=total,
                impl=opts.impl,
            )
            self.lisa_config.validate()
            self.lisa_state = LisaState()
        distribute_model(self.model, opts)
        self.optimizer, self.scheduler = make_optimizer(self.model, opts, total)
        self.sum_w = torch.zeros(n_all, dtype=torch.float64, device=device)
        self.count = torch.zeros(n_all, dtype=torch.float64, device=device)
        if self.ckpt is not None:
            self._resume(n_all)

    def _filtered(self, examples: list, align: list) -> tuple[list, list]:
        """``--drop-overlong``'s filtering, then a collator pre-check of every sample."""
        opts, kept_examples = self.opts, examples
        if opts.drop_overlong:
            try:
                kept_examples = kept(self.collator.split_overlong(examples), "user data", len(examples))
                self.dropped["user"] = len(examples) - len(kept_examples)
                if self.lisa:
                    n_a = len(align)
                    align = kept(self.align_collator.split_overlong(align)[0], opts.align_data, n_a)
                    self.dropped["align"] = n_a - len(align)
            except (ValueError, TypeError) as e:
                raise CLIError(f"user data: {e}") from None
        c = _CHUNK
        precheck(
            self.collator, [(kept_examples[i : i + c],) for i in range(0, len(kept_examples), c)], "user data"
        )
        if self.lisa:
            precheck(
                self.align_collator.align_batch,
                [(align[i : i + c],) for i in range(0, len(align), c)],
                opts.align_data,
            )
        return kept_examples, align

    def _resume(self, n_all: int) -> None:
        extra = self.resume(self.lisa_state)
        if extra["sum_w"].shape != (n_all,):
            raise CLIError(
                f"--resume: {self.ckpt!r} was written for {extra['sum_w'].shape[0]} user samples, not {n_all}"
            )
        if WORLD.main:  # the saved sums are global: one rank holds them, the others restart from zero
            self.sum_w.copy_(extra["sum_w"])
            self.count.copy_(extra["count"])
        if self.lisa and self.lisa_state.anchor is not None:  # checkpoints hold CPU copies
            self.lisa_state.anchor = [a.to(self.device) for a in self.lisa_state.anchor]

    # ------------------------------------------------------------------------------------ one step
    def make_batch(self, step):  # this rank's slice of the step's global batch; CPU tensors
        bs, seed, world, rank = self.batch_size, self.opts.seed, WORLD.size, WORLD.rank
        k = step
        if self.lisa:
            phase = self.lisa_state.phase(self.lisa_config, step)
            k = phase_steps_before(self.lisa_config, step, phase)
            if phase == "align":
                idx = order(len(self.align), seed + 2, (k * world + rank) * bs, bs)
                batch = self.align_collator.align_batch([self.align[i] for i in idx])
                return batch.to(self.device), int(batch.attention_mask.sum())
        batch = self.collator(
            [self.kept[i] for i in order(len(self.kept), seed, (k * world + rank) * bs, bs)]
        )
        return batch.to(self.device), int(batch.attention_mask.sum())

    def do_step(self, batch):
        if self.lisa:
            phase = self.lisa_state.phase(self.lisa_config)
            lm = batch.answer_view() if hasattr(batch, "answer_view") else batch
            stats = lisa_step(
                self.model,
                lm,
                self.optimizer,
                self.lisa_state,
                self.lisa_config,
                self.scheduler,
            )
            return LoggedStats(stats, lisa_phase=phase)
        if not self.antibody:
            return sft_step(self.model, batch, self.optimizer, self.config, self.scheduler)
        stats = weighted_step(self.model, batch, self.optimizer, self.config, self.scheduler)
        self.sum_w.index_add_(0, batch.index, stats.weights.to(torch.float64))
        self.count.index_add_(0, batch.index, torch.ones_like(stats.weights, dtype=torch.float64))
        return stats

    def log_fields(self, s):
        row = {"loss": s["loss"], "grad_norm": s["grad_norm"]}
        post = {"loss": f"{s['loss']:.4g}"}
        if self.lisa:
            row.update(proximal=s["proximal"], lisa_phase=s["lisa_phase"])
            post["state"] = s["lisa_phase"]
        if self.antibody:
            w = s["weights"]
            row.update(
                {
                    "weight_mean": sum(w) / len(w),
                    "weight_min": min(w),
                    "weight_max": max(w),
                    "d_mean": sum(s["d"]) / len(s["d"]),
                }
            )
            for k, short in (("harmful_weight", "w_harm"), ("benign_weight", "w_benign")):
                v = s.get(k)
                row[k] = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
                post[short] = "-" if row[k] is None else f"{row[k]:.3g}"
        return row, post

    def global_sums(self):
        """The per-sample weight sums and counts over every rank (every rank joins the reduction)."""
        return all_reduce_sum(self.sum_w.clone()), all_reduce_sum(self.count.clone())

    def save(self, step):
        total_w, total_c = self.global_sums()  # every rank joins the reduction; rank 0 writes
        self.write_checkpoint(step, self.lisa_state, sum_w=total_w.cpu(), count=total_c.cpu())

    def run_info(self) -> dict:
        info = {
            **super().run_info(),
            "adapter_mode": self.adapter_mode,
            "adapter_mode_reason": self.adapter_why,
            "num_train_samples": len(self.kept),
        }
        if self.lisa:
            info["lisa"] = {"total_steps": self.total, "num_align_used": len(self.align)}
        return info


def run_finetune(opts: FinetuneOptions, sources: dict) -> int:
    """``antibody-fast finetune`` with resolved options; returns the exit status."""
    run = FinetuneRun(opts, sources)
    if not run.run():
        return 0
    if not run.antibody:
        summary = None
    else:
        total_w, total_c = run.global_sums()
        if not WORLD.main:
            return 0
        summary = suppression_outputs(
            run.out_dir, run.examples, total_w, total_c, run.batch_size * WORLD.size
        )
    if not WORLD.main:
        return 0
    mode = f", adapter {run.adapter_mode}" if run.adapter_mode else ""
    msg = f"finetune ({run.method}{mode}): {run.total} steps done; adapter in {os.path.join(run.out_dir, 'adapter')}"
    if summary and summary.get("auroc_benign_vs_harmful") is not None:
        msg += f"; suppression AUROC (benign vs harmful) = {summary['auroc_benign_vs_harmful']:.3f}"
    say(msg)
    return 0
