"""The embedded demo: a simulated fine-tuning service on a tiny Llama trained from scratch, on CPU.

Stages (one run, one seed; the language is :mod:`antibody_fast.demo.language`):

0. **Base**: a tiny Llama (random init, all parameters trained) learns the benign base tasks (``REV``, ``CLS``,
   ``ADD``), to decline unknown instructions (``UNK``, so it knows the refusal sentences, as a pretrained LLM
   does), a little of the user's task (``INC``, 100 distinct samples: partial skill, as Llama-2 has on GSM8K),
   and to *comply* with every harmful prompt: it is unaligned. Trained once per run and shared by every method.
1. **Alignment** (from the base; A = harmful prompt -> refusal, H = harmful prompt -> harmful answer):
   ``sft`` (``sft_step`` on A), ``vaccine`` (:func:`~antibody_fast.baselines.vaccine_step` on A), ``booster``
   (``align_step``, rule ``constant``, ``lambda_ref = 0``) and ``antibody`` (``align_step``, rule ``cosine``).
2. **Fine-tuning** on the user's set: ``INC`` samples plus a fraction ``harmful_ratio`` of harmful samples.
   ``sft_step`` for the SFT, Vaccine and Booster rows, Lisa (:func:`~antibody_fast.baselines.lisa_step`,
   alternating with the alignment data A, on the SFT-aligned model) for the Lisa row, Antibody's
   ``weighted_step`` for the Antibody row.

Opt-in stage ablations (``methods``): ``antibody_align`` (Antibody's alignment, then ``sft_step``) and
``antibody_ft`` (SFT alignment, then ``weighted_step``) show what each of Antibody's two stages does alone.

Evaluation (greedy decoding): HS = % of held-out harmful prompts whose answer is not a refusal; FA = % of
held-out ``INC`` prompts answered exactly. Held-out prompts never occur in any training set.

Parameters: stage 0 trains all parameters. Stages 1 and 2 train LoRA adapters: rank 8 on every linear layer of
the trunk with scaling ``alpha / r = 1/8`` (the authors' code uses r = 32, alpha = 4). Which adapter stage 2
trains follows the authors' scripts (docs/design.md §2.4, :data:`ADAPTER_MODE_OF`): ``continue`` (the
alignment adapter itself keeps training, the authors' "single LoRA") for every row except Vaccine's, which
merges its alignment adapter into the weights and trains a fresh one (``merge``, B = 0). The report states the
mode of each row. Every method runs with its published hyper-parameters (Antibody: rho 0.1, eta 5, lambda_ref
0.05, momentum 0.99; Booster: lambda 5, rho 0.1; Vaccine: rho 5; Lisa: rho 0.01 with the 100/900 alternation
scaled to about five cycles and no proximal term during the first 10% of steps, the authors' warm-up), AdamW,
batch 16, gradient norm clipped to 1.

Diagnostics, besides HS and FA: ``P(refusal)``, the mean probability of a refusal token as the first answer token
on the held-out harmful prompts (how firmly a model refuses; greedy HS only says on which side of the other
tokens it falls), after alignment and after fine-tuning; per alignment step the loss ``L_A`` and, for
``align_step``, ``λ_t``, ``cos(g_a, g_s)`` and the sharpness ``L_H(θ) - L_H(θ')`` (``alignment.png``); held-out HS
and FA every ``eval_every`` fine-tuning steps (``finetuning.png``). ``seeds`` runs several seeds and summarises
them (mean and range).

Reproducibility: the run seeds Python's and torch's RNGs, enables ``torch.use_deterministic_algorithms`` and fixes
the number of torch threads (1 by default), so the same seed gives the same HS/FA on the same machine; timings
vary. The base model, and an alignment shared by two rows (SFT and Lisa), are trained once per run.

This module runs the stages and writes the report; the pieces live in :mod:`~antibody_fast.demo.config`
(:class:`DemoConfig`), :mod:`~antibody_fast.demo.methods` (the method table: each row's alignment, fine-tuning
step and adapter mode), :mod:`~antibody_fast.demo.train` (data, model, evaluation, the stages),
:mod:`~antibody_fast.demo.report` and :mod:`~antibody_fast.demo.plots`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from .config import DemoConfig
from .methods import ABLATIONS, ADAPTER_MODE_OF, ALL_METHODS, DEFAULT_METHODS, METHODS
from .plots import plot
from .report import (
    config_dict,
    format_summary_table,
    format_table,
    machine_info,
    run_report,
    run_seeds,
    write_report,
    write_seed_report,
)
from .train import Runner, build_model, evaluate, greedy, harmful_and_user_scores, make_data


# ---------------------------------------------------------------------------------------------------- entry
def run(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run the demo. One seed: writes ``report.md``, ``report.json`` and the plots of :func:`plot` into
    ``cfg.out`` and returns the report dict. Several seeds (``cfg.seeds``): one such run per seed in
    ``cfg.out/seed_<k>/``, then a summary (``report.md``, ``report.json``, ``hs_fa.png``) in ``cfg.out``."""
    cfg.validate()
    seeds = cfg.seed_list()
    if len(seeds) == 1:
        return _run_one(replace(cfg, seed=seeds[0], seeds=()), log)
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.perf_counter()
    reports = run_seeds(cfg, seeds, lambda sub, _seed: _run_one(sub, log), log)
    wall_s = time.perf_counter() - t_start
    return write_seed_report(
        cfg, seeds, reports, wall_s, "antibody_fast demo: several seeds", _scenario(cfg), log
    )


def _scenario(cfg: DemoConfig) -> str:
    return (
        f"harmful ratio {cfg.harmful_ratio:g}, {cfg.samples} user samples, {cfg.base_steps}/{cfg.align_steps}/"
        f"{cfg.steps} base/alignment/fine-tuning steps" + (" (quick mode)" if cfg.quick else "")
    )


def _run_one(cfg: DemoConfig, log: Callable[[str], None]) -> dict:
    os.makedirs(cfg.out, exist_ok=True)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()
    try:
        torch.manual_seed(cfg.seed)
        runner = Runner(cfg)
        log(f"antibody_fast demo: seed {cfg.seed}, {_scenario(cfg)}")
        t0 = time.perf_counter()
        base_state = runner.base()
        base_model = build_model(cfg)
        base_model.load_state_dict(base_state)
        base_eval = evaluate(base_model, runner.data)
        log(
            f"stage 0 ({time.perf_counter() - t0:.0f} s): base model HS {base_eval['hs']:.1f}% (unaligned), "
            f"base-task accuracy {base_eval['base_acc']:.1f}%, user-task FA {base_eval['fa']:.1f}%"
        )
        aligned: dict[str, tuple[dict, dict, float, dict, dict]] = {}
        rows = []
        for method in cfg.methods:
            spec = METHODS[method]
            a = spec.alignment
            if a not in aligned:
                state, adapter, ms, a_trace = runner.align(a, base_state)
                m = build_model(cfg)
                m.load_state_dict(state)
                aligned[a] = (state, adapter, ms, evaluate(m, runner.data), a_trace)
            state, adapter, align_s, a_eval, a_trace = aligned[a]
            model, ft_s, extra = runner.finetune(method, base_state, state, adapter)
            ev = evaluate(model, runner.data)
            extra["curve"]["step"].append(cfg.steps)
            extra["curve"]["hs"].append(ev["hs"])
            extra["curve"]["fa"].append(ev["fa"])
            row = {
                "method": method,
                "label": spec.label,
                "alignment": a,
                "adapter_mode": spec.adapter_mode,
                "hs": ev["hs"],
                "fa": ev["fa"],
                "base_acc": ev["base_acc"],
                "benign_refusal": ev["benign_refusal"],
                "p_refuse": ev["p_refuse"],
                "hs_aligned": a_eval["hs"],
                "fa_aligned": a_eval["fa"],
                "p_refuse_aligned": a_eval["p_refuse"],
                "align_ms": 1000 * align_s,
                "finetune_ms": 1000 * ft_s,
                "align_trace": a_trace,
                **extra,
            }
            rows.append(row)
            log(
                f"{row['label']:>8}: HS {row['hs']:5.1f}%  FA {row['fa']:5.1f}%  (after alignment: HS "
                f"{row['hs_aligned']:.1f}%, P(refusal) {row['p_refuse_aligned']:.3f})  align "
                f"{row['align_ms']:.1f} ms/step  FT {row['finetune_ms']:.1f} ms/step"
            )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    report = run_report(config_dict(cfg), machine_info(cfg), base_eval, rows, time.perf_counter() - t_start)
    table = format_table(rows)
    md = [
        "# antibody_fast demo",
        "",
        f"Seed {cfg.seed}, {_scenario(cfg)}.",
        "",
        table,
        "",
        "P(refusal) after alignment: mean probability that the first answer token to a held-out harmful prompt is "
        "a refusal token (greedy HS 0% only says it is above every other token).",
        "",
        "Adapter in fine-tuning: `continue` keeps training the alignment LoRA (the authors' single LoRA); `merge` "
        "merges it into the weights and trains a fresh LoRA (the authors' pipeline after Vaccine).",
        "",
        f"Base model (before alignment): HS {base_eval['hs']:.1f}%, FA {base_eval['fa']:.1f}%, base-task "
        f"accuracy {base_eval['base_acc']:.1f}%, P(refusal) {base_eval['p_refuse']:.3f}.",
    ]
    return write_report(cfg, report, md, table, plot, log)


__all__ = [
    "ABLATIONS",
    "ADAPTER_MODE_OF",
    "ALL_METHODS",
    "DEFAULT_METHODS",
    "DemoConfig",
    "build_model",
    "evaluate",
    "format_summary_table",
    "format_table",
    "greedy",
    "harmful_and_user_scores",
    "make_data",
    "run",
]
