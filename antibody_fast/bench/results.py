"""Reading result documents: one :class:`Row` per case (:func:`summarise`), the groups and ratios
(:func:`analyse`), merged and loaded documents, and the training-step target ratios (:func:`step_targets`)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HEADER_KEY = "antibody_fast"
OURS_PROVIDERS = ("ours", "antibody_fast", "antibody-fast", "cpp", "triton")


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values, ``q`` in [0, 100]."""
    if not sorted_vals:
        return math.nan
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _fmt_shape(shape) -> str:
    if shape is None:
        return ""
    if isinstance(shape, (list, tuple)):
        return "x".join(str(s) for s in shape)
    if isinstance(shape, dict):
        return ",".join(f"{k}={v}" for k, v in shape.items())
    return str(shape)


def is_ours(provider: str, extra: dict) -> bool:
    """antibody_fast's own case: ``extra_info["ours"]`` when given, else by provider name."""
    if "ours" in extra and extra["ours"] is not None:
        return bool(extra["ours"])
    p = provider.lower()
    return p in OURS_PROVIDERS or p.startswith("ours")


def is_floor(provider: str) -> bool:
    return "floor" in provider.lower()


@dataclass
class Row:
    """One benchmark case, summarised. Times in seconds, memory in bytes."""

    name: str
    fullname: str
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    device: str
    median: float
    p20: float
    p80: float
    rounds: int
    peak_mem: int | None = None
    launches: int | None = None
    tokens_per_step: float | None = None
    floor_s: float | None = None
    ours: bool = False
    floor: bool = False
    # filled by analyse()
    speedup: float | None = None  # their median / our median (non-ours rows)
    mem_ratio: float | None = None  # their peak / our peak (non-ours rows)
    limit_frac: float | None = None  # floor time / our median (ours rows)
    extra: dict = field(default_factory=dict)

    @property
    def group(self) -> tuple[str, str, str, str]:
        return (self.op, self.mode, self.shape, self.dtype)


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def summarise(bench: dict) -> Row:
    """Summarise one entry of pytest-benchmark's ``benchmarks`` list. Median/p20/p80 come from the raw
    round times (``stats.data``); without them the stats' median and quartiles (p25/p75) are used."""
    extra = dict(bench.get("extra_info") or {})
    stats = bench.get("stats") or {}
    data = sorted(float(x) for x in (stats.get("data") or []))
    if data:
        med, p20, p80 = _percentile(data, 50), _percentile(data, 20), _percentile(data, 80)
        rounds = len(data)
    else:
        med = float(stats.get("median", math.nan))
        p20, p80 = float(stats.get("q1", math.nan)), float(stats.get("q3", math.nan))
        rounds = int(stats.get("rounds", 0))
    name = bench.get("name", "?")
    provider = str(extra.get("provider") or bench.get("param") or name)
    op = str(extra.get("op") or bench.get("group") or name.split("[")[0])
    peak = _num(extra.get("peak_mem_bytes"))
    launches = _num(extra.get("launches"))
    return Row(
        name=name,
        fullname=bench.get("fullname", name),
        op=op,
        provider=provider,
        mode=str(extra.get("mode") or ""),
        shape=_fmt_shape(extra.get("shape")),
        dtype=str(extra.get("dtype") or "").replace("torch.", ""),
        device=str(extra.get("device") or ""),
        median=med,
        p20=p20,
        p80=p80,
        rounds=rounds,
        peak_mem=int(peak) if peak is not None else None,
        launches=int(launches) if launches is not None else None,
        tokens_per_step=_num(extra.get("tokens_per_step")),
        floor_s=_num(extra.get("floor_s")),
        ours=is_ours(provider, extra),
        floor=is_floor(provider),
        extra=extra,
    )


def analyse(rows: list[Row]) -> dict[tuple, list[Row]]:
    """Group rows by ``(op, mode, shape, dtype)`` and fill ``speedup``, ``mem_ratio`` and ``limit_frac``.
    Returns the groups in first-seen order."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    for members in groups.values():
        ours = [r for r in members if r.ours and not r.floor and math.isfinite(r.median)]
        floors = [r.median for r in members if r.floor and math.isfinite(r.median)]
        floors += [r.floor_s for r in members if r.floor_s is not None]
        # several floors: the largest is the tightest lower bound
        floor_t = max(floors) if floors else None
        for r in ours:
            if floor_t is not None and r.median > 0:
                r.limit_frac = floor_t / r.median
        if not ours:
            continue
        best = min(ours, key=lambda r: r.median)
        for r in members:
            if r.ours or r.floor:
                continue
            if best.median > 0 and math.isfinite(r.median):
                r.speedup = r.median / best.median
            if r.peak_mem is not None and best.peak_mem:
                r.mem_ratio = r.peak_mem / best.peak_mem
    return groups


def merge_results(docs: list[dict], sources: list[str] | None = None) -> dict:
    """One document holding the benchmarks of several result documents (e.g. suites run separately);
    the header is the first one's, with the skipped cases and floors of all and ``merged_from``."""
    if len(docs) == 1:
        return docs[0]
    merged = dict(docs[0])
    merged["benchmarks"] = [b for d in docs for b in d["benchmarks"]]
    header = dict(merged.get(HEADER_KEY) or {})
    for key in ("skipped", "failed"):
        header[key] = [s for d in docs for s in ((d.get(HEADER_KEY) or {}).get(key) or [])]
    floors = {}
    for d in docs:
        floors.update((d.get(HEADER_KEY) or {}).get("floors") or {})
    header["floors"] = floors
    header["merged_from"] = sources or []
    why = [
        f"{(sources or [])[i] if sources else i}: {h['interrupted']}"
        for i, h in enumerate((d.get(HEADER_KEY) or {}) for d in docs)
        if h.get("interrupted")
    ]
    header["interrupted"] = "; ".join(why) or None
    merged[HEADER_KEY] = header
    return merged


def load_results(path: str | os.PathLike) -> dict:
    """Load a result JSON (raw pytest-benchmark JSON, with or without our header)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such result file: {p}")
    try:
        with open(p) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise ValueError(f"{p}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    return doc


_REF_TOKENS = {"authors", "author", "reference", "ref", "naive"}
_FT_TOKENS = {"finetune", "ft", "weighted", "fine", "tune"}


def step_role(provider: str, mode: str = "") -> str | None:
    """Role of a training-step case in the training-steps targets, from the words of its provider and mode:
    ``weighted`` (weighted_step), ``sft`` (sft_step), ``hf_sft`` (HF's plain SFT step, e.g. ``hf-sft`` /
    ``reference_sft_step``), ``authors_ft`` (authors-style fine-tuning step), ``align`` (align_step),
    ``authors_align`` (authors-style alignment step); None otherwise. In mode ``finetune`` / ``align``,
    provider ``ours`` is weighted_step / align_step and ``authors`` the authors-style step."""
    words = set(re.split(r"[^a-z0-9]+", provider.lower())) - {""}
    mode_words = set(re.split(r"[^a-z0-9]+", mode.lower())) - {""}
    is_ref = bool(words & _REF_TOKENS)
    is_ours = "ours" in words or provider.lower() in OURS_PROVIDERS
    has_sft = "sft" in words
    has_hf = bool(words & {"hf", "huggingface", "transformers"})
    has_align = any(w.startswith("align") for w in words) or (
        not has_sft and not has_hf and any(w.startswith("align") for w in mode_words)
    )
    in_ft_mode = bool(mode_words & _FT_TOKENS)
    if has_align:
        return "authors_align" if is_ref else "align"
    if has_hf or (has_sft and is_ref):
        return "hf_sft"
    if is_ref and (words & _FT_TOKENS or in_ft_mode):
        return "authors_ft"
    if "weighted" in words or (is_ours and in_ft_mode):
        return "weighted"
    if has_sft:
        return "sft"
    return None


# (label, numerator role, denominator role, denominator factor, "<=" or ">=", CPU goal, GPU goal, what)
STEP_TARGETS = [
    ("weighted_step / sft_step", "weighted", "sft", 1.0, "<=", 1.10, 1.05, "time"),
    ("authors-style FT step / weighted_step", "authors_ft", "weighted", 1.0, ">=", 3.0, 1.5, "time"),
    ("weighted_step / HF plain SFT step", "weighted", "hf_sft", 1.0, "<=", 1.0, 1.0, "time"),
    ("authors-style align step / align_step", "authors_align", "align", 1.0, ">=", 2.0, 1.25, "time"),
    ("align_step / (4 x sft_step)", "align", "sft", 4.0, "<=", 1.05, 1.05, "time"),
    ("weighted_step / HF plain SFT step, peak memory", "weighted", "hf_sft", 1.0, "<=", 1.0, 1.0, "memory"),
]


def step_targets(rows: list[Row]) -> list[dict]:
    """The training-steps issue's target ratios, per (op, dtype, device) of the cases whose ``op`` contains
    ``step``, from the cases whose role :func:`step_role` recognises (a role held by two cases of the same
    (op, dtype, device) is ambiguous and its targets are left out)."""
    configs: dict[tuple, dict[str, list[Row]]] = {}
    for r in rows:
        if "step" not in r.op.lower() or r.floor:
            continue
        role = step_role(r.provider, r.mode)
        if role is not None:
            configs.setdefault((r.op, r.dtype, r.device), {}).setdefault(role, []).append(r)
    out = []
    for (op, dtype, device), roles in configs.items():
        gpu = device.startswith("cuda")
        for label, num, den, factor, cmp, cpu_goal, gpu_goal, what in STEP_TARGETS:
            if len(roles.get(num, [])) != 1 or len(roles.get(den, [])) != 1:
                continue
            a, b = roles[num][0], roles[den][0]
            if what == "time":
                x, y = a.median, b.median
            else:
                x, y = a.peak_mem, b.peak_mem
            if x is None or not y or not math.isfinite(x) or not math.isfinite(y):
                continue
            value = x / (factor * y)
            goal = gpu_goal if gpu else cpu_goal
            met = value <= goal if cmp == "<=" else value >= goal
            out.append(
                {
                    "config": f"{op} {dtype} {device}".strip(),
                    "target": label,
                    "value": value,
                    "goal": f"{cmp} {goal:g}",
                    "met": met,
                    "providers": tuple(f"{x.mode}:{x.provider}" if x.mode else x.provider for x in (a, b)),
                }
            )
    return out
