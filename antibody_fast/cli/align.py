"""``antibody-fast align``: the alignment stage with a LoRA adapter.

``--method antibody`` runs :func:`~antibody_fast.align_step` with the λ rule ``--rule``; ``booster`` runs
``align_step`` with a constant λ = η and no refusal term; both read the alignment data A, the harmful data H
and the refusals R on H's prompts (docs/design.md §2.2). ``vaccine``
(:func:`~antibody_fast.baselines.vaccine_step`) and ``sft`` (safety SFT) read A alone (docs/design.md §2.3).
"""

from __future__ import annotations

import os

from ..baselines import VaccineConfig, vaccine_step
from ..data import AlignCollator
from ..data.loaders import load_alignment, load_harmful
from ..steps import AlignConfig, AlignState, FinetuneConfig, align_step, sft_step
from .console import CLIError, say
from .inputs import collator_args, kept, order, precheck, refusal_pool, templated
from .loading import load_model
from .loop import TrainLoop, make_optimizer
from .options import AlignOptions
from .runtime import WORLD, amp_dtype, distribute_model, training_device

__all__ = ["AlignRun", "run_align"]

_CHUNK = 64  # samples per collator pre-check


class AlignRun(TrainLoop):
    """One ``align`` run: loads the data, the model with a fresh LoRA, the optimizer and (``--resume``) the
    checkpoint; the steps of ``--method``."""

    LOGGED = (
        "loss",
        "grad_norm",
        "lambda_t",
        "lambda_raw",
        "cos",
        "loss_align",
        "loss_combined",
        "loss_harmful",
        "loss_perturbed",
        "loss_refusal",
        "clean_loss",
        "perturbation_grad_norm",
    )

    def __init__(self, opts: AlignOptions, sources: dict):
        super().__init__(opts, sources)
        self.method = opts.method
        self.two_sets = two_sets = opts.two_sets  # align_step: A, H and R; sft / vaccine: A only
        align = templated(load_alignment(opts.align_data, limit=opts.num_align), opts)
        harmful = (
            templated(load_harmful(opts.harmful_data, limit=opts.num_harmful), opts) if two_sets else None
        )
        refusals = refusal_pool(opts)
        self.device = device = training_device(opts)
        amp = amp_dtype(opts, device)

        self.config = None
        if two_sets:
            self.config = AlignConfig(
                rule=opts.rule,
                eta=opts.eta,
                rho=opts.rho,
                lambda_ref=opts.lambda_ref,
                momentum=opts.momentum,
                max_grad_norm=opts.max_grad_norm or None,
                amp_dtype=amp,
                impl=opts.impl,
            )
            self.config.validate()
        self.sft_config = FinetuneConfig(
            max_grad_norm=opts.max_grad_norm or None, amp_dtype=amp, impl=opts.impl
        )
        self.model, tokenizer = load_model(opts, device, train=True)
        self.collator = AlignCollator(**collator_args(opts, tokenizer, refusals))
        align, harmful = self._filtered(align, harmful)
        self.align, self.harmful = align, harmful
        self.global_batch = opts.batch_size * WORLD.size
        self.total = opts.resolve_steps(len(align), self.global_batch)
        distribute_model(self.model, opts)
        self.optimizer, self.scheduler = make_optimizer(self.model, opts, self.total)
        self.state = AlignState() if two_sets else None  # λ's EMA (Antibody; Booster keeps it constant)
        if self.ckpt is not None:
            self.resume(self.state)

    def _filtered(self, align: list, harmful: list | None) -> tuple[list, list | None]:
        """``--drop-overlong``'s filtering, then a collator pre-check of every sample."""
        opts, collator = self.opts, self.collator
        what = opts.align_data + (" / " + opts.harmful_data if self.two_sets else "")
        if opts.drop_overlong:
            try:
                split_a, split_h = collator.split_overlong(align, harmful)
            except (ValueError, TypeError) as e:
                raise CLIError(f"{what}: {e}") from None
            n_a, n_h = len(align), len(harmful or ())
            align = kept(split_a, opts.align_data, n_a)
            self.dropped["align"] = n_a - len(align)
            if self.two_sets:
                harmful = kept(split_h, opts.harmful_data, n_h)
                self.dropped["harmful"] = n_h - len(harmful)
        c = _CHUNK
        if self.two_sets:
            precheck(
                collator,
                [(align[i : i + c], harmful[: min(c, len(harmful))]) for i in range(0, len(align), c)]
                + [(align[:1], harmful[i : i + c]) for i in range(0, len(harmful), c)],
                what,
            )
        else:
            precheck(collator.align_batch, [(align[i : i + c],) for i in range(0, len(align), c)], what)
        return align, harmful

    # ------------------------------------------------------------------------------------ one step
    def make_batch(self, step):  # this rank's slice of the step's global batch
        bs, seed, align = self.opts.batch_size, self.opts.seed, self.align
        pos = (step * WORLD.size + WORLD.rank) * bs
        a = [align[i] for i in order(len(align), seed, pos, bs)]
        if not self.two_sets:
            batch = self.collator.align_batch(a)  # CPU tensors
            return batch.to(self.device), int(batch.attention_mask.sum())
        h_idx = order(len(self.harmful), seed + 1, pos, bs)
        batch = self.collator(a, [self.harmful[i] for i in h_idx])  # CPU tensors
        ntok = int(sum(b.attention_mask.sum() for b in (batch.align, batch.harmful, batch.refusal)))
        return batch.to(self.device), ntok

    def do_step(self, batch):
        if self.method == "vaccine":
            vaccine_config = VaccineConfig(
                rho=self.opts.vaccine_rho, max_grad_norm=self.opts.max_grad_norm or None, impl=self.opts.impl
            )
            return vaccine_step(self.model, batch, self.optimizer, vaccine_config, self.scheduler)
        if self.method == "sft":
            return sft_step(self.model, batch, self.optimizer, self.sft_config, self.scheduler)
        return align_step(self.model, batch, self.optimizer, self.state, self.config, self.scheduler)

    def log_fields(self, s):
        post = {"loss": f"{s['loss']:.4g}"}
        if self.two_sets:
            post["lambda_t"] = f"{s.get('lambda_t', 0.0):.3g}"
        return {k: s[k] for k in self.LOGGED if k in s}, post

    def save(self, step):
        self.write_checkpoint(step, self.state)

    def run_info(self) -> dict:
        info = {**super().run_info(), "num_align_used": len(self.align)}
        if self.two_sets:
            info["num_harmful_used"] = len(self.harmful)
        return info


def run_align(opts: AlignOptions, sources: dict) -> int:
    """``antibody-fast align`` with resolved options; returns the exit status."""
    run = AlignRun(opts, sources)
    if run.run() and WORLD.main:
        say(
            f"align ({run.method}): {run.total} steps done; adapter in {os.path.join(run.out_dir, 'adapter')}"
        )
    return 0
