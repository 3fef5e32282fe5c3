"""``antibody-fast evaluate``: fine-tune accuracy (FA) on a task test set and harmful score (HS) on harmful
prompts (:func:`antibody_fast.evaluate.evaluate_model`), written to ``eval.json`` and ``samples.jsonl``.
Runs in one process."""

from __future__ import annotations

import json
import os

from .._io import atomic_write_text
from ..data.loaders import load_harmful, load_task
from ..evaluate import RefusalPatternJudge, evaluate_model, make_judge
from .console import CLIError, progress_bar, say
from .inputs import template
from .loading import check_adapters, check_model_source, load_model
from .options import EvaluateOptions
from .runtime import resolve_device

__all__ = ["run_evaluate"]


def run_evaluate(opts: EvaluateOptions) -> int:
    """``antibody-fast evaluate`` with resolved options; returns the exit status."""
    out_dir = opts.output
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CLIError(f"--output {out_dir!r} exists and is not a directory")
    task_examples = load_task(opts.task, opts.task_data, limit=opts.num_eval) if opts.task_data else None
    harmful_prompts = None
    if opts.harmful_prompts:
        recs = load_harmful(
            opts.harmful_prompts, only_unsafe=False, require_response=False, limit=opts.num_eval
        )
        harmful_prompts = [template(r["prompt"], opts) for r in recs]
    check_model_source(opts.model)
    check_adapters(opts.adapter)
    if opts.judge_model and not os.path.isdir(opts.judge_model):
        check_model_source(opts.judge_model)
    device = resolve_device(opts.device)

    model, tokenizer = load_model(opts, device, train=False)
    if opts.judge_model:
        try:
            judge = make_judge(opts.judge_model, opts.judge_kind, device=device)
        except (OSError, ValueError) as e:
            raise CLIError(f"--judge-model {opts.judge_model!r}: {e}") from None
    else:
        judge = RefusalPatternJudge()
    total = (len(task_examples) if task_examples else 0) + (len(harmful_prompts) if harmful_prompts else 0)
    bar = progress_bar(total, 0, "evaluate", disable=opts.no_progress)
    try:
        result = evaluate_model(
            model,
            tokenizer,
            task=opts.task,
            task_examples=task_examples,
            harmful_prompts=harmful_prompts,
            judge=judge,
            max_new_tokens=opts.max_new_tokens,
            batch_size=opts.batch_size,
            max_prompt_length=opts.max_length,
            progress=bar.update,
        )
    finally:
        bar.close()
    samples = result.pop("samples")
    result["model"] = opts.model
    result["adapters"] = opts.adapter
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "samples.jsonl"), "".join(json.dumps(s) + "\n" for s in samples))
    atomic_write_text(os.path.join(out_dir, "eval.json"), json.dumps(result, indent=2) + "\n")
    parts = []
    if result["fa"] is not None:
        parts.append(f"FA ({opts.task}) = {result['fa']:.2f}%")
    if result["hs"] is not None:
        parts.append(f"HS = {result['hs']:.2f}% [judge: {result['judge']}]")
    say("evaluate: " + ("; ".join(parts) if parts else "done") + f"; results in {out_dir}")
    return 0
