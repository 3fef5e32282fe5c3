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
* **task** data of the user (:func:`load_task`: ``sst2``, ``agnews``, ``gsm8k``, ``alpaca``, in the paper's
  Alpaca prompt template) and the poisoned user set (:func:`build_poisoned_set`): see
  :mod:`antibody_fast.data.tasks` for their formats.

Every error is a :class:`DataError` (a ``ValueError``) naming the file, the line (or record) and the field.
``datasets`` is never imported at module import; it is used only to read a source that is not a local file
(a hub dataset id) when it is installed.

Reading records is :mod:`antibody_fast.data.records`'s, the task formats and the poisoned set are
:mod:`antibody_fast.data.tasks`'s; this module reads the harmful, alignment and refusal files and gathers every
loader under one import path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from . import tasks
from .records import LIST_KEYS, DataError, read_records, take, text_field
from .tasks import *  # noqa: F403  (the task loaders, under this import path too)

__all__ = [
    "DataError",
    "read_records",
    "load_harmful",
    "load_alignment",
    "load_refusals",
    "strip_refusal_wrapper",
    *tasks.__all__,
]


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
        prompt = text_field(rec, where, "prompt")
        response = text_field(rec, where, "response", required=require_response)
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
    return take(out, limit, "unsafe" if only_unsafe else "harmful", source)


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
        refusal = text_field(rec, where, "refusal", required=False)
        if refusal is not None:
            question, answer = strip_refusal_wrapper(refusal)
            if question is None:
                prompt = text_field(rec, where, "prompt")
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
            {
                "prompt": text_field(rec, where, "prompt"),
                "response": text_field(rec, where, "refusal", "response"),
            }
        )
    return take(out, limit, "alignment", source)


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
            parsed = next((parsed[k] for k in LIST_KEYS if isinstance(parsed.get(k), list)), None)
            if parsed is None:
                raise DataError(
                    f"{path}: expected a JSON list of refusals (or an object with a list under one of "
                    f"{LIST_KEYS})"
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
            value = text_field(value, where, *_REFUSAL_FIELDS)
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
