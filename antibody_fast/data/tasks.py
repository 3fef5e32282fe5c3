"""The user's task data and the poisoned user set of the paper.

* **task** data (Alpaca prompt template of the paper, :func:`alpaca_prompt`), :func:`load_task`:
    - ``sst2``: ``sentence``, ``label`` (0 negative / 1 positive, or the word) -> answer ``positive``/``negative``;
    - ``agnews``: ``text``, ``label`` (0..3 or the name) -> answer ``World``/``Sports``/``Business``/``Sci/Tech``;
    - ``gsm8k``: ``question``, ``answer`` (the reasoning ending in ``#### N``) -> the reasoning followed by
      ``The final answer is: N``;
    - ``alpaca``: ``instruction``, ``input`` (optional), ``output``.
  Task examples also carry ``"label"`` (the gold answer used by :mod:`antibody_fast.evaluate`) and ``"task"``.
* :func:`build_poisoned_set` mixes task and harmful samples as the paper does: ``n`` samples of which
  ``floor(p * n)`` are harmful, in a seeded random order; ``is_harmful`` flags are kept for reports only.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence

from .records import DataError, read_records, take, text_field

__all__ = [
    "TASKS",
    "SST2_LABELS",
    "AGNEWS_LABELS",
    "GSM8K_ANSWER_PREFIX",
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_NO_INPUT",
    "alpaca_prompt",
    "load_task",
    "harmful_as_task",
    "build_poisoned_set",
    "with_index",
    "as_dataset",
]

TASKS = ("sst2", "agnews", "gsm8k", "alpaca")
SST2_LABELS = ("negative", "positive")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_ANSWER_PREFIX = "The final answer is:"

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative."
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    + "\n".join(AGNEWS_LABELS)
)
GSM8K_INSTRUCTION = "Solve the following math problem step by step, and end with the final answer."


def alpaca_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002 - Alpaca's field name
    """The Alpaca prompt template used by the paper (with or without an input paragraph)."""
    if input is not None and str(input).strip():
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


def _label_name(rec: Mapping, where: str, names: Sequence[str]) -> str:
    if "label" not in rec or rec["label"] is None:
        raise DataError(f"{where}: missing field 'label'")
    lab = rec["label"]
    if isinstance(lab, bool):
        raise DataError(f"{where}: field 'label' must be an int in [0, {len(names)}) or one of {list(names)}")
    if isinstance(lab, int):
        if not 0 <= lab < len(names):
            raise DataError(f"{where}: field 'label' = {lab} out of range [0, {len(names)})")
        return names[lab]
    if isinstance(lab, str):
        for n in names:
            if lab.strip().lower() == n.lower():
                return n
    raise DataError(
        f"{where}: field 'label' = {lab!r} is not an int in [0, {len(names)}) nor one of {list(names)}"
    )


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def _task_example(task: str, rec: Mapping, where: str) -> dict:
    if task == "sst2":
        sentence = text_field(rec, where, "sentence", "text")
        label = _label_name(rec, where, SST2_LABELS)
        return {"prompt": alpaca_prompt(SST2_INSTRUCTION, sentence), "response": label, "label": label}
    if task == "agnews":
        text = text_field(rec, where, "text", "sentence")
        label = _label_name(rec, where, AGNEWS_LABELS)
        return {"prompt": alpaca_prompt(AGNEWS_INSTRUCTION, text), "response": label, "label": label}
    if task == "gsm8k":
        question = text_field(rec, where, "question")
        answer = text_field(rec, where, "answer")
        m = _GSM8K_FINAL.search(answer)
        if m is None:
            raise DataError(f"{where}: field 'answer' has no final answer marked '#### <number>'")
        final = m.group(1).strip()
        reasoning = answer[: m.start()].rstrip()
        response = (reasoning + "\n" if reasoning else "") + f"{GSM8K_ANSWER_PREFIX} {final}"
        return {"prompt": alpaca_prompt(GSM8K_INSTRUCTION, question), "response": response, "label": final}
    # alpaca
    instruction = text_field(rec, where, "instruction")
    inp = text_field(rec, where, "input", required=False, allow_empty=True)
    output = text_field(rec, where, "output")
    return {"prompt": alpaca_prompt(instruction, inp), "response": output, "label": output}


def load_task(
    task: str, source: str | os.PathLike, *, limit: int | None = None, split: str = "train"
) -> list[dict]:
    """User task data (``task`` in :data:`TASKS`) formatted with the paper's Alpaca template.

    Returns ``[{"prompt", "response", "label", "task", "is_harmful": False}]`` where ``label`` is the gold
    answer (``positive``/``negative``, an AG News class name, the GSM8K final number, or the Alpaca output).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    out = []
    for where, rec in read_records(source, split=split):
        ex = _task_example(task, rec, where)
        ex["task"] = task
        ex["is_harmful"] = False
        out.append(ex)
    return take(out, limit, task, source)


def harmful_as_task(harmful: Iterable[Mapping]) -> list[dict]:
    """Harmful (prompt, response) pairs in the task format: the prompt becomes an Alpaca instruction with no
    input, as the paper mixes them into the user data."""
    out = []
    for h in harmful:
        if h.get("response") is None:
            raise DataError("harmful_as_task: a harmful record has no response")
        out.append(
            {
                "prompt": alpaca_prompt(h["prompt"]),
                "response": h["response"],
                "label": None,
                "task": "harmful",
                "is_harmful": True,
            }
        )
    return out


def build_poisoned_set(
    task_examples: Sequence[Mapping],
    harmful_examples: Sequence[Mapping],
    *,
    n: int,
    harmful_ratio: float,
    seed: int = 0,
) -> list[dict]:
    """The poisoned user set of the paper: ``n`` samples, ``floor(harmful_ratio * n)`` of them harmful.

    Benign samples are drawn without replacement from ``task_examples``, harmful ones from
    ``harmful_examples`` (BeaverTails-style, formatted with the Alpaca template); the result is shuffled
    with ``random.Random(seed)`` and re-indexed: each example gets ``"index"`` = its position and
    ``"is_harmful"`` (for reports only -- the algorithm never reads it).

    Raises ``ValueError`` for a ratio outside [0, 1], ``n < 1``, or too few examples of either kind.
    """
    if (
        isinstance(harmful_ratio, bool)
        or not isinstance(harmful_ratio, (int, float))
        or math.isnan(harmful_ratio)
    ):
        raise ValueError(f"harmful ratio must be a number in [0, 1], got {harmful_ratio!r}")
    if not 0.0 <= harmful_ratio <= 1.0:
        raise ValueError(f"harmful ratio must be in [0, 1], got {harmful_ratio!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of user samples) must be a positive int, got {n!r}")
    n_harm = int(math.floor(harmful_ratio * n + 1e-9))
    n_benign = n - n_harm
    if n_harm > len(harmful_examples):
        raise ValueError(
            f"need {n_harm} harmful examples (ratio {harmful_ratio} of {n}) but only {len(harmful_examples)} given"
        )
    if n_benign > len(task_examples):
        raise ValueError(f"need {n_benign} task examples but only {len(task_examples)} given")
    rng = random.Random(seed)
    benign = [
        dict(task_examples[i], is_harmful=False) for i in rng.sample(range(len(task_examples)), n_benign)
    ]
    harm_src = [harmful_examples[i] for i in rng.sample(range(len(harmful_examples)), n_harm)]
    harmful = harmful_as_task(harm_src)
    mixed = benign + harmful
    rng.shuffle(mixed)
    return with_index(mixed)


def with_index(examples: Iterable[Mapping], start: int = 0) -> list[dict]:
    """Copies of ``examples`` with ``"index"`` = ``start`` + position (the collators' refusal key)."""
    return [dict(ex, index=start + i) for i, ex in enumerate(examples)]


def as_dataset(examples: Sequence[Mapping]):
    """A ``datasets.Dataset`` of ``examples`` when ``datasets`` is installed, else the list itself (any
    sequence of dicts works as a torch map-style dataset)."""
    try:
        import datasets
    except ImportError:
        return list(examples)
    return datasets.Dataset.from_list([dict(e) for e in examples])
