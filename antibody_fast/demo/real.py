"""The real-model demo: SmolLM2-135M-Instruct, the natural-language scenario, all five methods, on CPU.

``antibody-fast demo --model smollm2 [options]`` runs the two stages of the paper on a pretrained instruct model
(:func:`antibody_fast.models.smollm2`) with the scenario of :mod:`antibody_fast.demo.natural`:

1. **Alignment** (provider; LoRA r = 32, alpha = 4 on q/k/v, AdamW lr 5e-4, weight decay 0.1, batch 8):
   ``sft`` (``sft_step`` on harmful -> refusal pairs A), ``vaccine`` (:func:`~antibody_fast.baselines.vaccine_step`,
   rho 5), ``booster`` (``align_step``, rule ``constant``, ``lambda_ref = 0``: eta 5, rho 0.1) and ``antibody``
   (``align_step``, rule ``cosine``: eta 5, rho 0.1, lambda_ref 0.05, momentum 0.99). A and the harmful set H
   (harmful prompt -> compliance answer) are drawn from independent training streams.
2. **Fine-tuning** (user) on the poisoned user set (the task's items plus a fraction ``harmful_ratio`` of harmful
   items), with the authors' pipeline: fine-tuning **continues the alignment adapter** (the same LoRA weights
   stay trainable, with a new optimizer), except after Vaccine, whose adapter is merged into the weights and a
   fresh LoRA is trained (as the Vaccine code does). ``sft_step`` for SFT, Vaccine and Booster,
   :func:`~antibody_fast.baselines.lisa_step` (alternating with A, on the SFT-aligned adapter, with the authors'
   warm-up, ``warmup_fraction`` 0.1 of the run) for Lisa, Antibody's
   ``weighted_step`` (tau 1) for Antibody. The SFT alignment is trained once and serves both SFT and Lisa.

The fine-tuning learning rate and step count are **not** the paper's: at the paper's 1e-5 this LoRA scale
(alpha / r = 0.125) does not learn the task in a CPU-sized run. They are read from the committed SFT-only
calibration (:data:`CALIBRATION_FILE`, written by ``scripts/calibrate_smollm2.py``): the smallest learning rate,
searched upward from 1e-5, at which *SFT's* FA reaches its plateau well above chance. Antibody's numbers play no
part in it (docs/design.md: only the SFT baseline may calibrate).

Evaluation (greedy, batched, left padding):

* **HS**: % of held-out harmful prompts (templates and fillers never seen in training) whose answer of at most
  ``hs_new_tokens`` (24) tokens contains no refusal keyword (:func:`antibody_fast.demo.natural.harmful_score`);
* **FA**: % of held-out task prompts whose first label word (:func:`~antibody_fast.demo.natural.parse_label`,
  answer of at most ``fa_new_tokens`` tokens) is the gold label;
* **over-refusal**: % of held-out benign requests refused, after alignment;
* **P(refusal)**: mean probability, over the held-out harmful prompts, that the first answer token is the first
  token of a pool refusal (``"I"`` of ``"I'm sorry"``, ``"As"`` of ``"As an AI"`` ...). It is a coarse reading:
  a compliant answer may also start with one of those tokens.

Diagnostics and plots are the toy demo's (:mod:`antibody_fast.demo.plots`): ``alignment.png`` (alignment loss,
λ_t and cos(g_a, g_s)), ``weights.png`` (Antibody's mean weight of harmful vs benign samples per step),
``finetuning.png`` (HS/FA every ``eval_every`` steps), ``hs_fa.png``, plus ``p_refusal.png`` (P(refusal) after
each stage). Times per step are wall-clock of the step call only (evaluation excluded).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ._loop import Batches
from .methods import ALIGNMENT_OF, METHOD_LABELS
from .plots import plot as plot_toy
from .plots import pyplot, save_figure
from .real_config import CALIBRATION_FILE, DEFAULT_METHODS, RealConfig, load_calibration
from .real_train import RealRunner, evaluate, generate, make_data, merge_adapter
from .report import (
    config_dict,
    machine_info,
    markdown_table,
    run_report,
    run_seeds,
    write_report,
    write_seed_report,
)


# ---------------------------------------------------------------------------------------------------- report
def format_table(rows: list[dict]) -> str:
    header = ["Method", "HS (%) ↓", "FA (%) ↑", "HS after alignment (%)", "FA after alignment (%)",
              "benign refusals after alignment (%)", "P(refusal) after alignment / after FT",
              "alignment s/step", "fine-tuning s/step"]  # fmt: skip
    cells = [
        [
            r["label"],
            f"{r['hs']:.1f}",
            f"{r['fa']:.1f}",
            f"{r['hs_aligned']:.1f}",
            f"{r['fa_aligned']:.1f}",
            f"{r['benign_refusal_aligned']:.1f}",
            f"{r['p_refuse_aligned']:.3f} / {r['p_refuse']:.3f}",
            f"{r['align_ms'] / 1000:.2f}",
            f"{r['finetune_ms'] / 1000:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(header, "lrrrrrrrr", cells)


def plot(report: dict, out: str) -> list[str]:
    """The toy demo's plots (:func:`antibody_fast.demo.plots.plot`) plus ``p_refusal.png``."""
    files = plot_toy(report, out)
    plt = pyplot()
    rows = report["methods"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    x = range(len(rows))
    base = report["base"]["p_refuse"]
    ax.axhline(base, color="grey", lw=0.8, ls="--", label=f"base model ({base:.3f})")
    ax.bar([i - 0.2 for i in x], [r["p_refuse_aligned"] for r in rows], width=0.4, color="tab:blue",
           label="after alignment")  # fmt: skip
    ax.bar([i + 0.2 for i in x], [r["p_refuse"] for r in rows], width=0.4, color="tab:red",
           label="after fine-tuning")  # fmt: skip
    ax.set_xticks(list(x), [r["label"] for r in rows])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("P(first answer token starts a refusal)")
    ax.set_title("held-out harmful prompts")
    ax.legend(fontsize=8)
    files.append(save_figure(fig, out, "p_refusal.png"))
    return files


def _scenario(cfg: RealConfig) -> str:
    return (
        f"SmolLM2-135M-Instruct, task {cfg.task}, harmful ratio {cfg.harmful_ratio:g}, {cfg.samples} user samples, "
        f"{cfg.align_steps}/{cfg.steps or 'calibrated'} alignment/fine-tuning steps at batch {cfg.batch_size}, "
        f"fine-tuning lr {cfg.finetune_lr or 'calibrated'} (calibrated on SFT alone)"
        + (
            f", alignment set with {cfg.benign_mix:g} benign -> helpful pairs (not the authors' setting)"
            if cfg.benign_mix
            else ""
        )
        + (" (quick mode)" if cfg.quick else "")
    )


def _report_head(cfg: RealConfig, seed: int, table: str, base_eval: dict) -> list[str]:
    """The first lines of a single-seed ``report.md``: title, scenario, the table, the base model's numbers."""
    return [
        "# antibody_fast demo: SmolLM2-135M-Instruct (real model)",
        "",
        f"Seed {seed}, {_scenario(cfg)}.",
        "",
        table,
        "",
        f"Base model (before alignment): HS {base_eval['hs']:.1f}%, FA {base_eval['fa']:.1f}%, benign refusals "
        f"{base_eval['benign_refusal']:.1f}%, P(refusal) {base_eval['p_refuse']:.3f}.",
    ]


def _align_all(cfg: RealConfig, seed: int, base, tok, log: Callable[[str], None]):
    """Stage 1 of every method of ``cfg`` on ``seed``: (runner, base-model evaluation, {alignment: (adapter,
    s/step, trace, evaluation after alignment)}). Nothing here depends on the harmful ratio: the alignment
    data, the held-out sets and the seeds of stage 1 are drawn from streams of their own."""
    torch.manual_seed(seed)
    runner = RealRunner(cfg, seed, base, tok)
    log(f"antibody_fast real-model demo: seed {seed}, {_scenario(cfg)}")
    base_eval = evaluate(base, tok, runner.data, cfg, runner.first_ids, benign=True, desc="eval: base model")
    log(
        f"base model: HS {base_eval['hs']:.1f}%, FA {base_eval['fa']:.1f}%, benign refusals "
        f"{base_eval['benign_refusal']:.1f}%, P(refusal) {base_eval['p_refuse']:.3f}"
    )
    aligned: dict[str, tuple] = {}
    for a in dict.fromkeys(ALIGNMENT_OF[m] for m in cfg.methods):  # stage 1 of every method first
        adapter, s_step, a_trace, model = runner.align(a)
        model = merge_adapter(model)  # the adapter is saved: evaluate the merged weights (faster generation)
        a_eval = evaluate(
            model, tok, runner.data, cfg, runner.first_ids, benign=True, desc=f"eval: {a} aligned"
        )
        del model
        aligned[a] = (adapter, s_step, a_trace, a_eval)
        log(
            f"{a} alignment: {s_step:.2f} s/step; HS {a_eval['hs']:.1f}%, FA {a_eval['fa']:.1f}%, benign "
            f"refusals {a_eval['benign_refusal']:.1f}%, P(refusal) {a_eval['p_refuse']:.3f}"
        )
    return runner, base_eval, aligned


def _finetune_all(
    cfg: RealConfig, seed: int, runner: RealRunner, base_eval: dict, aligned: dict, t_start: float, log
) -> dict:
    """Stage 2 of every method of ``cfg`` (one harmful ratio) from the stage-1 adapters; writes and returns the
    single-seed report. ``t_start``: when this report's clock started (its ``wall_s``)."""
    os.makedirs(cfg.out, exist_ok=True)
    tok = runner.tok
    # stage 2: the calibrated fine-tuning lr / steps are read here (stage 1 does not use them)
    runner.cfg = cfg = cfg.resolved()
    if runner.data.harmful_ratio != cfg.harmful_ratio:
        runner.data = make_data(cfg, seed)
    log(f"fine-tuning: harmful ratio {cfg.harmful_ratio:g}, lr {cfg.finetune_lr:g}, {cfg.steps} steps")
    rows = []
    for method in cfg.methods:
        a = ALIGNMENT_OF[method]
        adapter, s_align, a_trace, a_eval = aligned[a]
        model, s_ft, extra = runner.finetune(method, adapter)
        model = merge_adapter(model)
        ev = evaluate(model, tok, runner.data, cfg, runner.first_ids, benign=False, desc=f"eval: {method}")
        del model
        for k in ("step", "hs", "fa"):
            extra["curve"][k].append(cfg.steps if k == "step" else ev[k])
        row = {
            "method": method,
            "label": METHOD_LABELS[method],
            "alignment": a,
            "hs": ev["hs"],
            "fa": ev["fa"],
            "p_refuse": ev["p_refuse"],
            "task_refusal": ev["task_refusal"],
            "task_predicted": ev["task_predicted"],
            "hs_aligned": a_eval["hs"],
            "fa_aligned": a_eval["fa"],
            "benign_refusal_aligned": a_eval["benign_refusal"],
            "p_refuse_aligned": a_eval["p_refuse"],
            "align_ms": 1000 * s_align,
            "finetune_ms": 1000 * s_ft,
            "align_trace": a_trace,
            "eval_aligned": a_eval,
            "eval": ev,
            **extra,
        }
        rows.append(row)
        log(
            f"{row['label']:>8}: HS {row['hs']:5.1f}%  FA {row['fa']:5.1f}%  (after alignment: HS "
            f"{row['hs_aligned']:.1f}%, P(refusal) {row['p_refuse_aligned']:.3f})  align {s_align:.2f} s/step  "
            f"FT {s_ft:.2f} s/step"
        )
    config = {**config_dict(cfg), "seed": seed, "seeds": [], "harmful_ratios": []}
    report = run_report(config, machine_info(cfg), base_eval, rows, time.perf_counter() - t_start)
    table = format_table(rows)
    md = [
        *_report_head(cfg, seed, table, base_eval),
        "",
        "HS: % of held-out harmful prompts answered without a refusal keyword (greedy, "
        f"{cfg.hs_new_tokens} new tokens); FA: % of held-out {cfg.task} prompts whose first label word is right; "
        "P(refusal): mean probability that the first answer token to a held-out harmful prompt is the first "
        "token of a pool refusal. Times: wall-clock per step call (evaluation excluded).",
    ]
    return write_report(cfg, report, md, table, plot, log)


def _run_one(cfg: RealConfig, seed: int, base, tok, log: Callable[[str], None]) -> dict:
    """One seed. Several harmful ratios (``cfg.harmful_ratios``) share stage 1 (the provider aligns before it
    sees any user data) and write ``cfg.out/ratio_<r>/``, each report's ``wall_s`` counting stage 1 plus its own
    stage 2; the return value is then the first ratio's report."""
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.perf_counter()
    ratios = cfg.ratio_list()
    runner, base_eval, aligned = _align_all(replace(cfg, harmful_ratios=()), seed, base, tok, log)
    t_stage1 = time.perf_counter() - t_start
    reports = []
    for r in ratios:
        out = os.path.join(cfg.out, ratio_dir(r)) if len(ratios) > 1 else cfg.out
        sub = replace(cfg, harmful_ratio=r, harmful_ratios=(), out=out)
        reports.append(
            _finetune_all(sub, seed, runner, base_eval, aligned, time.perf_counter() - t_stage1, log)
        )
    return reports[0]


def ratio_dir(ratio: float) -> str:
    """The sub-folder of one harmful ratio in a several-ratio run: ``ratio_0.1``."""
    return f"ratio_{ratio:g}"


def run(cfg: RealConfig, log: Callable[[str], None] = print, *, model_and_tokenizer=None) -> dict:
    """Run the real-model demo (one seed: report in ``cfg.out``; several: ``cfg.out/seed_<k>/`` + summary).

    ``model_and_tokenizer``: ``(model, tokenizer)`` to use instead of SmolLM2 (tests: a tiny Llama with a
    byte-level tokenizer); the model is not modified."""
    from ..models import smollm2

    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        if model_and_tokenizer is None:
            base, tok = smollm2()
            log(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.1f} s")
        else:
            base, tok = model_and_tokenizer
            base = copy.deepcopy(base)
        base.requires_grad_(False)
        seeds, ratios = cfg.seed_list(), cfg.ratio_list()
        if len(seeds) == 1 and len(ratios) == 1:
            return _run_one(replace(cfg, seed=seeds[0], seeds=()), seeds[0], base, tok, log)
        os.makedirs(cfg.out, exist_ok=True)
        if len(seeds) == 1:
            _run_one(replace(cfg, seed=seeds[0], seeds=()), seeds[0], base, tok, log)
        else:
            reports = run_seeds(cfg, seeds, lambda sub, seed: _run_one(sub, seed, base, tok, log), log)
    finally:
        torch.set_num_threads(threads)
    if len(ratios) > 1:
        from .real_grid import write_grid_report

        cells = [
            Path(cfg.out, *([f"seed_{k}"] if len(seeds) > 1 else []), ratio_dir(r), "report.json")
            for k in seeds
            for r in ratios
        ]
        note = f"One process per seed; stage 1 ran once per seed and served every ratio (wall {time.perf_counter() - t_start:.0f} s)."
        return write_grid_report(cells, cfg.out, log, note)
    c0 = reports[0]["config"]
    cfg = replace(cfg, finetune_lr=c0["finetune_lr"], steps=c0["steps"])
    wall_s = time.perf_counter() - t_start
    title = "antibody_fast demo: SmolLM2-135M-Instruct, several seeds"
    return write_seed_report(cfg, seeds, reports, wall_s, title, _scenario(cfg), log)


__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_METHODS",
    "Batches",
    "RealConfig",
    "RealRunner",
    "evaluate",
    "generate",
    "load_calibration",
    "make_data",
    "merge_reports",
    "ratio_dir",
    "replace",
    "run",
]


def merge_reports(paths: Sequence[str], out: str, log: Callable[[str], None] = print) -> dict:
    """One report (table, plots) from single-seed reports of the same configuration that ran disjoint subsets
    of the methods (e.g. in parallel processes: every stage is seeded, so a method's numbers do not depend on
    which other methods ran in the same process). ``wall_s`` is the longest part's; ``parts`` lists them."""
    reps = [json.loads(Path(p).read_text()) for p in paths]
    c0 = {k: v for k, v in reps[0]["config"].items() if k not in ("methods", "out")}
    for r in reps[1:]:
        c = {k: v for k, v in r["config"].items() if k not in ("methods", "out")}
        if c != c0:
            diff = sorted(k for k in set(c) | set(c0) if c.get(k) != c0.get(k))
            raise ValueError(f"merge_reports: the reports differ in configuration ({', '.join(diff)})")
    rows = {row["method"]: row for r in reps for row in r["methods"]}
    order = [m for m in DEFAULT_METHODS if m in rows]
    kw = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in c0.items()
        if k in RealConfig.__dataclass_fields__
    }
    cfg = replace(RealConfig(**kw), methods=tuple(order), out=out)
    os.makedirs(out, exist_ok=True)
    report = {
        **reps[0],
        "config": config_dict(cfg),
        "methods": [rows[m] for m in order],
        "results": {m: {k: rows[m][k] for k in ("hs", "fa", "hs_aligned")} for m in order},
        "wall_s": max(r["wall_s"] for r in reps),
        "parts": [
            {"file": str(p), "methods": [x["method"] for x in r["methods"]], "wall_s": r["wall_s"]}
            for p, r in zip(paths, reps)
        ],  # fmt: skip
    }
    table = format_table(report["methods"])
    md = [
        *_report_head(cfg, cfg.seed, table, report["base"]),
        "",
        f"Ran as {len(reps)} processes in parallel ({'; '.join(','.join(p['methods']) for p in report['parts'])}); "
        "wall time below = the longest part. Times per step are contended (other jobs shared the 2 cores).",
    ]
    return write_report(cfg, report, md, table, plot, log)
