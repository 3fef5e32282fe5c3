"""The summary of real-model runs over seeds x harmful ratios (:func:`write_grid_report`): per ratio and method,
HS and FA as mean [min–max] over the seeds, the stage-1 numbers, and Antibody's harmful/benign weight ratio
(the diagnostic of whether its weighting separates the two); ``grid.png`` plots HS and FA against the ratio.

The cells are single-seed ``report.json`` files of :mod:`antibody_fast.demo.real` (one run per cell, or a
several-ratio run's ``ratio_<r>/``); they must agree on every setting except the seed, the ratio, the output
folder and the methods, so that the summary never mixes scenarios."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .methods import DEFAULT_METHODS, METHOD_LABELS
from .plots import method_colors, pyplot, save_figure
from .report import markdown_table, spread

_FREE = ("seed", "seeds", "harmful_ratio", "harmful_ratios", "out", "methods", "progress", "threads")
"""Settings in which the cells of one grid may differ."""


EARLY_STEPS = 5
"""The first steps with a harmful sample in the batch, reported apart (:func:`weight_ratio`)."""


def weight_ratio(row: dict, part: str = "all") -> float | None:
    """Mean harmful weight / mean benign weight over a ``weighted_step`` run's fine-tuning (``None`` for the
    other methods, or when no step qualifies). 1: no separation; below 1: harmful samples are down-weighted, as
    the method intends. Steps whose batch lacks one of the two kinds (NaN) are skipped. ``part``: ``"all"``,
    ``"early"`` (the first :data:`EARLY_STEPS` qualifying steps) or ``"late"`` (the others)."""
    tr = row.get("trace", {})
    h, b = tr.get("harmful_weight", []), tr.get("benign_weight", [])
    pairs = [(x, y) for x, y in zip(h, b) if x == x and y == y]
    pairs = {"all": pairs, "early": pairs[:EARLY_STEPS], "late": pairs[EARLY_STEPS:]}[part]
    if not pairs:
        return None
    return (sum(x for x, _ in pairs) / len(pairs)) / (sum(y for _, y in pairs) / len(pairs))


def grid_summary(reports: Sequence[dict]) -> dict:
    """``{"ratios", "seeds", "methods": {ratio: [row per method]}, "cells"}`` from single-seed ``reports``.

    Raises ``ValueError`` when the reports differ in any other setting, or a (seed, ratio) cell is repeated."""
    if not reports:
        raise ValueError("grid_summary: no reports")
    c0 = {k: v for k, v in reports[0]["config"].items() if k not in _FREE}
    cells: dict[tuple[float, int], dict] = {}
    for r in reports:
        c = {k: v for k, v in r["config"].items() if k not in _FREE}
        if c != c0:
            diff = sorted(k for k in set(c) | set(c0) if c.get(k) != c0.get(k))
            raise ValueError(f"grid_summary: the reports differ in {', '.join(diff)}")
        key = (float(r["config"]["harmful_ratio"]), int(r["config"]["seed"]))
        if key in cells:
            raise ValueError(f"grid_summary: two reports for ratio {key[0]:g}, seed {key[1]}")
        cells[key] = r
    ratios = sorted({k[0] for k in cells})
    seeds = sorted({k[1] for k in cells})
    out: dict[str, list[dict]] = {}
    for ratio in ratios:
        reps = [cells[(ratio, s)] for s in seeds if (ratio, s) in cells]
        rows = []
        for m in DEFAULT_METHODS:
            per = [next((x for x in rep["methods"] if x["method"] == m), None) for rep in reps]
            per = [x for x in per if x is not None]
            if not per:
                continue
            wr = {part: [w for w in (weight_ratio(x, part) for x in per) if w is not None]
                  for part in ("all", "early", "late")}  # fmt: skip
            rows.append(
                {
                    "method": m,
                    "label": METHOD_LABELS[m],
                    "seeds": [
                        rep["config"]["seed"] for rep in reps if any(x["method"] == m for x in rep["methods"])
                    ],
                    **{k: [x[k] for x in per] for k in ("hs", "fa", "hs_aligned", "benign_refusal_aligned")},
                    "weight_ratio": wr["all"],
                    "weight_ratio_early": wr["early"],
                    "weight_ratio_late": wr["late"],
                }
            )
        out[f"{ratio:g}"] = rows
    return {
        "config": c0,
        "ratios": ratios,
        "seeds": seeds,
        "methods": out,
        "cells": [{"harmful_ratio": k[0], "seed": k[1]} for k in sorted(cells)],
        "machines": sorted({r["machine"]["cpu"] for r in reports}),
    }


def format_grid_table(summary: dict) -> str:
    """One row per (ratio, method): HS and FA mean [min–max] over the seeds, per-seed values, stage 1's HS and
    benign refusals (mean) and Antibody's harmful/benign weight ratio."""
    header = ["ratio", "Method", "seeds", "HS (%) ↓ mean [min–max]", "FA (%) ↑ mean [min–max]", "HS per seed",
              "FA per seed", "HS after alignment (%)", "benign refusals after alignment (%)",
              "harmful/benign weight", f"same, first {EARLY_STEPS} steps / later"]  # fmt: skip
    cells = []
    for ratio, rows in summary["methods"].items():
        for r in rows:
            mean = lambda v: f"{sum(v) / len(v):.1f}"  # noqa: E731
            cells.append([
                ratio, r["label"], str(len(r["hs"])), spread(r["hs"]), spread(r["fa"]),
                " / ".join(f"{x:.0f}" for x in r["hs"]), " / ".join(f"{x:.0f}" for x in r["fa"]),
                mean(r["hs_aligned"]), mean(r["benign_refusal_aligned"]),
                spread(r["weight_ratio"], ".2f") if r["weight_ratio"] else "",
                (f"{_mean(r['weight_ratio_early']):.2f} / {_mean(r['weight_ratio_late']):.2f}"
                 if r["weight_ratio_early"] and r["weight_ratio_late"] else ""),
            ])  # fmt: skip
    return markdown_table(header, "llrrrllrrrr", cells)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def plot_grid(summary: dict, out: str) -> list[str]:
    """``grid.png``: HS and FA (mean over seeds, bars = min–max) against the harmful ratio, one line per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ratios = summary["ratios"]
    labels = {r["method"]: r["label"] for rows in summary["methods"].values() for r in rows}
    colors = method_colors(list(labels))
    n = len(labels)
    for ax, key, title in ((axes[0], "hs", "HS (%) ↓"), (axes[1], "fa", "FA (%) ↑")):
        for j, m in enumerate(labels):
            xs, mid, lo, hi = [], [], [], []
            for ratio in ratios:
                row = next((r for r in summary["methods"][f"{ratio:g}"] if r["method"] == m), None)
                if row is None:
                    continue
                v = row[key]
                xs.append(
                    ratio + (j - (n - 1) / 2) * 0.006
                )  # side by side, so the bars do not hide each other
                mid.append(sum(v) / len(v))
                lo.append(mid[-1] - min(v))
                hi.append(max(v) - mid[-1])
            ax.errorbar(xs, mid, yerr=[lo, hi], marker="o", capsize=3, color=colors[m], label=labels[m])
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.set_xlabel("harmful ratio of the user's set")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{title}: mean over seeds, bars = range")
    axes[0].legend(fontsize=8)
    return [save_figure(fig, out, "grid.png")]


def write_grid_report(
    paths: Sequence[str | os.PathLike], out: str, log: Callable[[str], None] = print, note: str = ""
) -> dict:
    """Summarise the single-seed ``report.json`` files ``paths`` into ``out/report.md``, ``out/report.json``
    and ``out/grid.png``; ``note`` is added under the table (how the cells were run). Returns the summary."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    summary = grid_summary(reports)
    summary["files_in"] = [str(p) for p in paths]
    os.makedirs(out, exist_ok=True)
    table = format_grid_table(summary)
    c = summary["config"]
    md = [
        "# antibody_fast demo: SmolLM2-135M-Instruct, seeds x harmful ratios",
        "",
        f"Seeds {', '.join(map(str, summary['seeds']))}; harmful ratios "
        f"{', '.join(f'{r:g}' for r in summary['ratios'])}; task {c.get('task')}, {c.get('samples')} user samples, "
        f"{c.get('align_steps')}/{c.get('steps')} alignment/fine-tuning steps at batch {c.get('batch_size')}, "
        f"fine-tuning lr {c.get('finetune_lr')}.",
        "",
        table,
        "",
        "harmful/benign weight: Antibody's mean per-sample weight of harmful samples over that of benign ones during "
        f"fine-tuning (1 = no separation; steps whose batch has both kinds), mean [min–max] over the seeds; then the "
        f"same over the first {EARLY_STEPS} such steps and over the later ones (means over the seeds).",
        *([""] + [note] if note else []),
        "",
        f"Machines: {', '.join(summary['machines'])}. Cells: {', '.join(map(str, paths))}.",
        "",
    ]
    Path(out, "report.md").write_text("\n".join(md))
    summary["files"] = plot_grid(summary, out) + [os.path.join(out, n) for n in ("report.md", "report.json")]
    Path(out, "report.json").write_text(json.dumps(summary, indent=2))
    log(table)
    log(f"wrote {', '.join(summary['files'])}")
    return summary
