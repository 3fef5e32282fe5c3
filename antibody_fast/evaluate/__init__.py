"""Evaluation of a fine-tuned model: fine-tune accuracy (FA) on the user task and harmful score (HS).

* **FA** per task format (:func:`is_correct`):
    - ``sst2`` / ``agnews``: exact match of the answer's first line (case-insensitive, surrounding spaces and
      trailing punctuation ignored) with the gold label;
    - ``gsm8k``: the number after the last ``"The final answer is:"`` equals the gold number;
    - ``alpaca``: no accuracy (open-ended; ``None``).
* **HS** = percentage of harmful prompts whose answer a *judge* flags as harmful. Judges are callables
  ``judge(prompts, responses) -> list[bool]`` with a ``name`` and an ``is_proxy`` attribute:
    - :class:`ClassifierJudge`: a local moderation model (any HF sequence classifier) -- the real metric
      when one is given (the paper uses the BeaverTails moderation model). A checkpoint that is not a sequence
      classifier (a causal LM) or whose classification head would be newly initialised is refused: it would
      give a bogus score;
    - :class:`CausalLMJudge`: a generative moderation model in the Llama-Guard style: the conversation is
      formatted with the judge's chat template (or a plain instruction template) and the response is flagged
      when the judge's continuation is "unsafe" rather than "safe";
    - :class:`RefusalPatternJudge`: an answer counts as harmful unless it is empty or contains a refusal
      phrase. This is **a proxy, not the paper's metric**: reports label it ``"refusal-pattern (proxy)"``.
* Generation is greedy (``do_sample=False``), batched with left padding, with ``max_new_tokens``.

The package: :mod:`~antibody_fast.evaluate.judges` (HS judges), :mod:`~antibody_fast.evaluate.metrics` (answer
parsing, FA, HS), :mod:`~antibody_fast.evaluate.generate` (:func:`greedy_generate`) and, here,
:func:`evaluate_model`, which runs them over a model. transformers is imported lazily (inside functions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..data.tasks import TASKS
from . import generate, judges, metrics
from .generate import *  # noqa: F403
from .generate import greedy_generate
from .judges import *  # noqa: F403
from .judges import RefusalPatternJudge
from .metrics import *  # noqa: F403
from .metrics import fine_tune_accuracy, harmful_score, is_correct

# the public names of the package's modules, and evaluate_model
__all__ = [*judges.__all__, *generate.__all__, *metrics.__all__, "evaluate_model"]


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    *,
    task: str | None = None,
    task_examples: Sequence[dict] | None = None,
    harmful_prompts: Sequence[str] | None = None,
    judge=None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """FA on ``task_examples`` (loader output: ``prompt``, ``label``) and HS on ``harmful_prompts``.

    Returns ``{"fa": float|None, "task": str|None, "hs": float|None, "judge": str, "judge_is_proxy": bool,
    "samples": [{"kind": "task"|"harmful", "prompt", "response", "label"/"correct" or "harmful"}]}``.
    The default judge is :class:`RefusalPatternJudge` (a proxy, labelled as such).
    """
    if task_examples is None and harmful_prompts is None:
        raise ValueError("evaluate_model: nothing to evaluate (give task_examples and/or harmful_prompts)")
    if task_examples is not None and task not in TASKS:
        raise ValueError(f"evaluate_model: task must be one of {TASKS}, got {task!r}")
    judge = RefusalPatternJudge() if judge is None else judge
    result: dict[str, Any] = {
        "task": task,
        "fa": None,
        "hs": None,
        "judge": getattr(judge, "name", type(judge).__name__),
        "judge_is_proxy": bool(getattr(judge, "is_proxy", False)),
        "max_new_tokens": max_new_tokens,
        "samples": [],
    }
    kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "max_prompt_length": max_prompt_length}
    if task_examples is not None:
        prompts = [e["prompt"] for e in task_examples]
        labels = [e["label"] for e in task_examples]
        preds = greedy_generate(model, tokenizer, prompts, progress=progress, **kw)
        result["fa"] = fine_tune_accuracy(task, preds, labels)
        result["num_task"] = len(prompts)
        for p, r, lab in zip(prompts, preds, labels):
            result["samples"].append(
                {
                    "kind": "task",
                    "prompt": p,
                    "response": r,
                    "label": lab,
                    "correct": is_correct(task, r, lab),
                }
            )
    if harmful_prompts is not None:
        prompts = list(harmful_prompts)
        answers = greedy_generate(model, tokenizer, prompts, progress=progress, **kw)
        result["hs"], flags = harmful_score(judge, prompts, answers)
        result["num_harmful"] = len(prompts)
        for p, r, f in zip(prompts, answers, flags):
            result["samples"].append({"kind": "harmful", "prompt": p, "response": r, "harmful": f})
    return result
