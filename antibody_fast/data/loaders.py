"""Loaders for the paper's data formats (JSON / JSONL files, or hub datasets when ``datasets`` is installed).

Every loader returns a list of plain example dicts ``{"prompt": str, "response": str, ...}`` ready for the
collators of :mod:`antibody_fast.data.collate` (they add ``"index"`` where the collators need it).

Formats (one JSON object per record; a ``.json`` file holds a list of records, or an object whose ``"data"``,
``"train"``, ``"test"`` or ``"rows"`` entry is that list; a ``.jsonl`` file holds one record per line, blank
lines ignored):

* **harmful** (BeaverTails style): ``prompt``, ``response``, ``is_safe`` (bool, optional), ``category``
  (a string, or BeaverTails' dict ``{name: bool}``; optional). :func:`load_harmful` keeps the unsafe records
  (``is_safe`` false, or absent) and flags them ``is_harmful=True``.
* **alignment** (harmful prompt -> refusal answer), :func:`load_alignment`: ``prompt`` and ``refusal`` (or
  ``response``). Two layouts are read:
    - the authors' *BeaverTails with refusals* file: a JSON list of BeaverTails rows (``prompt``,
      ``response``, ``category``, ``is_safe: false``), each with a ``refusal`` wrapped as
      ``"Question: <q>\nAnswer: <a>"``. The wrapper is stripped: the prompt is ``<q>`` and the answer ``<a>``,
      as the authors' code does. The same file is also the harmful data of the alignment stage
      (:func:`load_harmful` reads its ``prompt`` -> ``response``);
    - plain rows ``{"prompt", "refusal"}`` or BeaverTails rows, where rows with ``is_safe: false`` and no
      ``refusal`` field are skipped (their response is harmful), so the safe rows are the alignment data.
* **refusal pool**, :func:`load_refusals`: a JSONL file (the authors': 100 lines, one refusal each, as a JSON
  string), a JSON list, or a text file with one refusal per line.
* **task** data of the user (Alpaca prompt template of the paper, :func:`alpaca_prompt`):
    - ``sst2``: ``sentence``, ``label`` (0 negative / 1 positive, or the word) -> answer ``positive``/``negative``;
    - ``agnews``: ``text``, ``label`` (0..3 or the name) -> answer ``World``/``Sports``/``Business``/``Sci/Tech``;
    - ``gsm8k``: ``question``, ``answer`` (the reasoning ending in ``#### N``) -> the reasoning followed by
      ``The final answer is: N``;
    - ``alpaca``: ``instruction``, ``input`` (optional), ``output``.
  Task examples also carry ``"label"`` (the gold answer used by :mod:`antibody_fast.evaluate`) and ``"task"``.

:func:`build_poisoned_set` mixes task and harmful samples as the paper does: ``n`` samples of which
``floor(p * n)`` are harmful, in a seeded random order; ``is_harmful`` flags are kept for reports only.

Every error is a :class:`DataError` (a ``ValueError``) naming the file, the line (or record) and the field.
``datasets`` is never imported at module import; it is used only to read a source that is not a local file
(a hub dataset id) when it is installed.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DataError",
    "TASKS",
    "SST2_LABELS",
    "AGNEWS_LABELS",
    "GSM8K_ANSWER_PREFIX",
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_NO_INPUT",
    "alpaca_prompt",
    "read_records",
    "load_harmful",
    "load_alignment",
    "load_refusals",
    "strip_refusal_wrapper",
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

_LIST_KEYS = ("data", "train", "test", "rows")


class DataError(ValueError):
    """Bad data: malformed JSON, a missing or ill-typed field, an empty dataset, a bad ratio. The message
    names the file, the line (JSONL, or the JSON line where parsing failed) or record number, and the field."""


def alpaca_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002 - Alpaca's field name
    """The Alpaca prompt template used by the paper (with or without an input paragraph)."""
    if input is not None and str(input).strip():
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


# ----------------------------------------------------------------------------------------------- reading
def _where(source: str, line: int | None, record: int) -> str:
    return f"{source}:{line}" if line is not None else f"{source} (record {record})"


def _parse_json_file(path: str) -> list[tuple[int | None, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl") or path.endswith(".ndjson"):
        return _parse_jsonl(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if _first_line_is_object(text):
            # a JSONL file with a .json name: parse it line by line (errors then name the bad line)
            return _parse_jsonl(text, path)
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, Mapping):
        for key in _LIST_KEYS:
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise DataError(
                f"{path}: expected a JSON list of records (or an object with a list under one of {_LIST_KEYS})"
            )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(None, rec) for rec in data]


def _first_line_is_object(text: str) -> bool:
    for line in text.splitlines():
        if line.strip():
            try:
                return isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                return False
    return False


def _parse_jsonl(text: str, path: str) -> list[tuple[int | None, Any]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    return out


def read_records(source: str | os.PathLike, *, split: str = "train") -> list[tuple[str, Any]]:
    """Read the raw records of ``source`` as ``[(location, record), ...]``.

    ``source`` is a ``.json`` / ``.jsonl`` file (parsed with the standard library, so errors name the line),
    or, when it is not a local path and ``datasets`` is installed, a hub dataset id loaded with
    ``datasets.load_dataset(source, split=split)`` (``HF_HUB_OFFLINE`` is respected by ``datasets``).
    ``location`` is ``"file:line"`` (or ``"file (record k)"`` for a JSON list) for error messages.

    Raises:
        FileNotFoundError: no such file (and no ``datasets`` to try a hub id).
        DataError: malformed JSON, a record that is not an object, or no record at all.
    """
    src = os.fspath(source)
    if os.path.isdir(src):
        raise DataError(f"{src}: is a directory; pass a .json or .jsonl file")
    if os.path.isfile(src):
        parsed = _parse_json_file(src)
        name = src
    else:
        looks_like_file = src.endswith((".json", ".jsonl", ".ndjson")) or os.sep in src and not _hub_id(src)
        try:
            import datasets  # noqa: F401
        except ImportError:
            datasets = None
        if looks_like_file or datasets is None:
            raise FileNotFoundError(f"data file not found: {src!r}")
        try:
            ds = datasets.load_dataset(src, split=split)
        except Exception as e:  # datasets raises many types; keep the reason
            raise FileNotFoundError(
                f"{src!r} is not a local file and could not be loaded with datasets: {e}"
            ) from e
        parsed = [(None, dict(r)) for r in ds]
        name = f"{src}[{split}]"
    out = []
    for k, (line, rec) in enumerate(parsed):
        where = _where(name, line, k)
        if not isinstance(rec, Mapping):
            raise DataError(f"{where}: expected a JSON object per record, got {type(rec).__name__}")
        out.append((where, rec))
    if not out:
        raise DataError(f"{name}: the dataset is empty (no records)")
    return out


def _hub_id(s: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s) is not None


def _text(
    rec: Mapping, where: str, *fields: str, required: bool = True, allow_empty: bool = False
) -> str | None:
    """The first of ``fields`` present in ``rec`` as a string."""
    for f in fields:
        if f in rec and rec[f] is not None:
            v = rec[f]
            if not isinstance(v, str):
                raise DataError(f"{where}: field {f!r} must be a string, got {type(v).__name__}")
            if not allow_empty and not v.strip():
                raise DataError(f"{where}: field {f!r} is empty")
            return v
    if required:
        alts = " or ".join(repr(f) for f in fields)
        raise DataError(f"{where}: missing field {alts}")
    return None


def _take(records: list, limit: int | None, what: str, source) -> list:
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        records = records[:limit]
    if not records:
        raise DataError(f"{os.fspath(source)}: no {what} records")
    return records


# ----------------------------------------------------------------------------------------------- formats
def _category(rec: Mapping, where: str) -> str | None:
    cat = rec.get("category")
    if cat is None:
        return None
    if isinstance(cat, str):
        return cat
    if isinstance(cat, Mapping):  # BeaverTails: {name: bool}
        return ",".join(sorted(str(k) for k, v in cat.items() if v)) or None
    raise DataError(
        f"{where}: field 'category' must be a string or an object of booleans, got {type(cat).__name__}"
    )


def load_harmful(
    source: str | os.PathLike,
    *,
    only_unsafe: bool = True,
    require_response: bool = True,
    limit: int | None = None,
    split: str = "train",
) -> list[dict]:
    """BeaverTails-style harmful data.

    Records: ``prompt`` (str), ``response`` (str; optional with ``require_response=False``, e.g. for the
    evaluation prompts), ``is_safe`` (bool, optional), ``category`` (optional).

    Returns ``[{"prompt", "response" (or None), "is_harmful": not is_safe, "category"}]``; with
    ``only_unsafe`` (default) records marked ``is_safe: true`` are dropped. ``limit`` keeps the first records.
    """
    out = []
    for where, rec in read_records(source, split=split):
        prompt = _text(rec, where, "prompt")
        response = _text(rec, where, "response", required=require_response)
        safe = rec.get("is_safe")
        if safe is not None and not isinstance(safe, bool):
            raise DataError(f"{where}: field 'is_safe' must be a boolean, got {safe!r}")
        if only_unsafe and safe is True:
            continue
        out.append(
            {
                "prompt": prompt,
                "response": response,
                "is_harmful": safe is not True,
                "category": _category(rec, where),
            }
        )
    return _take(out, limit, "unsafe" if only_unsafe else "harmful", source)


_WRAPPER = re.compile(r"Question: (.*?)\nAnswer: ?(.*)", re.S)


def strip_refusal_wrapper(text: str) -> tuple[str | None, str]:
    """Split the authors' refusal wrapper ``"Question: <q>\nAnswer: <a>"`` into ``(<q>, <a>)``.

    Text without the wrapper is returned as ``(None, text)``. The question ends at the first ``"\nAnswer:"``
    (one space after the colon is part of the wrapper) and the answer is everything after it. The authors'
    code keeps only the text up to a second ``"\nAnswer: "`` and removes every ``"Question: "`` in the
    question; the two readings differ only on refusals that repeat the wrapper's markers.
    """
    m = _WRAPPER.fullmatch(text)
    if m is None:
        return None, text
    return m.group(1), m.group(2)


def load_alignment(
    source: str | os.PathLike, *, limit: int | None = None, split: str = "train"
) -> list[dict]:
    """Alignment data: harmful prompt -> refusal (safe) answer.

    Records: ``prompt`` and ``refusal`` (or ``response``), optionally ``is_safe``.

    * A record with a ``refusal`` field gives ``refusal`` as the answer, whatever its ``is_safe``: this is the
      authors' *BeaverTails with refusals* file, where every row is ``is_safe: false`` and the refusal is
      wrapped as ``"Question: <q>\nAnswer: <a>"``. The wrapper is stripped (:func:`strip_refusal_wrapper`) and
      ``<q>`` is the prompt, as in the authors' code; an unwrapped refusal keeps the record's ``prompt``.
    * A record without ``refusal`` gives its ``response``, unless it is marked ``is_safe: false`` (a
      BeaverTails row whose response is harmful): those are skipped, so a BeaverTails file's safe rows are
      the alignment data.

    Returns ``[{"prompt", "response": refusal}]`` (prompts without a template; ``limit`` keeps the first).

    Raises:
        DataError: a missing or empty field, a wrapper with an empty question or answer, or no record left.
    """
    out = []
    for where, rec in read_records(source, split=split):
        safe = rec.get("is_safe")
        if safe is not None and not isinstance(safe, bool):
            raise DataError(f"{where}: field 'is_safe' must be a boolean, got {safe!r}")
        refusal = _text(rec, where, "refusal", required=False)
        if refusal is not None:
            question, answer = strip_refusal_wrapper(refusal)
            if question is None:
                prompt = _text(rec, where, "prompt")
            else:
                if not question.strip():
                    raise DataError(f"{where}: field 'refusal' wraps an empty question ('Question: ')")
                if not answer.strip():
                    raise DataError(f"{where}: field 'refusal' wraps an empty answer ('Answer: ')")
                prompt = question
            out.append({"prompt": prompt, "response": answer})
            continue
        if safe is False:
            continue
        out.append(
            {"prompt": _text(rec, where, "prompt"), "response": _text(rec, where, "refusal", "response")}
        )
    return _take(out, limit, "alignment", source)


_REFUSAL_FIELDS = ("refusal", "response", "output", "text")


def load_refusals(source: str | os.PathLike) -> list[str]:
    """A refusal pool from a file, for the collators' ``refusals=`` (sample ``i`` gets entry
    ``index_i mod len(pool)``).

    Formats (by content, not by name):

    * **JSONL** (the authors' pool: 100 lines): one refusal per non-empty line, read as the authors' code
      reads it. A line holding a JSON string is that string; a line that is not valid JSON is the line itself,
      stripped of surrounding whitespace; a line holding a JSON object gives its first field among
      ``refusal``, ``response``, ``output``, ``text``.
    * **JSON**: a list of such strings or objects (or an object with the list under ``data``/``train``/
      ``test``/``rows``).
    * **text** (``.txt``): one refusal per non-empty line, stripped.

    Returns the refusals in file order (``list[str]``).

    Raises:
        FileNotFoundError: no such file.
        DataError: an empty file, an empty refusal, or a JSON value that is neither a string nor such an
            object (named by line).
    """
    path = os.fspath(source)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; pass a .jsonl, .json or .txt file of refusals")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"refusal file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    items: list[tuple[str, Any]] = []
    parsed = None
    if not path.endswith((".txt", ".jsonl", ".ndjson")):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, Mapping):
            parsed = next((parsed[k] for k in _LIST_KEYS if isinstance(parsed.get(k), list)), None)
            if parsed is None:
                raise DataError(
                    f"{path}: expected a JSON list of refusals (or an object with a list under one of "
                    f"{_LIST_KEYS})"
                )
    if isinstance(parsed, list):
        items = [(f"{path} (record {k})", v) for k, v in enumerate(parsed)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            value: Any = line
            if not path.endswith(".txt"):
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    value = line
            items.append((f"{path}:{lineno}", value))
    out = []
    for where, value in items:
        if isinstance(value, Mapping):
            value = _text(value, where, *_REFUSAL_FIELDS)
        elif not isinstance(value, str):
            raise DataError(
                f"{where}: expected a refusal string (or an object with one of {_REFUSAL_FIELDS}), got "
                f"{type(value).__name__} {value!r}"[:300]
            )
        if not value.strip():
            raise DataError(f"{where}: empty refusal")
        out.append(value)
    if not out:
        raise DataError(f"{path}: no refusals (the file is empty)")
    return out


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
        sentence = _text(rec, where, "sentence", "text")
        label = _label_name(rec, where, SST2_LABELS)
        return {"prompt": alpaca_prompt(SST2_INSTRUCTION, sentence), "response": label, "label": label}
    if task == "agnews":
        text = _text(rec, where, "text", "sentence")
        label = _label_name(rec, where, AGNEWS_LABELS)
        return {"prompt": alpaca_prompt(AGNEWS_INSTRUCTION, text), "response": label, "label": label}
    if task == "gsm8k":
        question = _text(rec, where, "question")
        answer = _text(rec, where, "answer")
        m = _GSM8K_FINAL.search(answer)
        if m is None:
            raise DataError(f"{where}: field 'answer' has no final answer marked '#### <number>'")
        final = m.group(1).strip()
        reasoning = answer[: m.start()].rstrip()
        response = (reasoning + "\n" if reasoning else "") + f"{GSM8K_ANSWER_PREFIX} {final}"
        return {"prompt": alpaca_prompt(GSM8K_INSTRUCTION, question), "response": response, "label": final}
    # alpaca
    instruction = _text(rec, where, "instruction")
    inp = _text(rec, where, "input", required=False, allow_empty=True)
    output = _text(rec, where, "output")
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
    return _take(out, limit, task, source)


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
