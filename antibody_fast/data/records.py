"""Reading records from JSON / JSONL files (or hub datasets when ``datasets`` is installed), with errors that
name the file, the line (or record) and the field: :func:`read_records`, :class:`DataError`, and the field
helpers the loaders share (:func:`text_field`, :func:`take`).

A ``.json`` file holds a list of records, or an object whose ``"data"``, ``"train"``, ``"test"`` or
``"rows"`` entry is that list; a ``.jsonl`` file holds one record per line, blank lines ignored. ``datasets``
is never imported at module import; it is used only to read a source that is not a local file (a hub dataset
id) when it is installed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["DataError", "read_records", "text_field", "take", "LIST_KEYS"]

LIST_KEYS = ("data", "train", "test", "rows")
"""The keys under which a JSON object may hold its list of records."""


class DataError(ValueError):
    """Bad data: malformed JSON, a missing or ill-typed field, an empty dataset, a bad ratio. The message
    names the file, the line (JSONL, or the JSON line where parsing failed) or record number, and the field."""


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
        for key in LIST_KEYS:
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise DataError(
                f"{path}: expected a JSON list of records (or an object with a list under one of {LIST_KEYS})"
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


def text_field(
    rec: Mapping, where: str, *fields: str, required: bool = True, allow_empty: bool = False
) -> str | None:
    """The first of ``fields`` present in ``rec`` as a string (``None`` when absent and not ``required``);
    a non-string or (unless ``allow_empty``) blank value is a :class:`DataError` naming ``where``."""
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


def take(records: list, limit: int | None, what: str, source) -> list:
    """The first ``limit`` records (all with ``None``); none left is a :class:`DataError` naming ``source``."""
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        records = records[:limit]
    if not records:
        raise DataError(f"{os.fspath(source)}: no {what} records")
    return records
