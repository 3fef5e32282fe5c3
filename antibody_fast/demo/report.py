"""Reports of the demos: the Markdown tables, ``report.md`` / ``report.json`` (:func:`write_report`), the
machine line, and the summary of several seeds (:func:`seed_summary`)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, replace

from ..info import environment
from .methods import ADAPTER_MODE_OF, METHOD_LABELS
from .plots import plot_summary


def machine_info(cfg) -> dict:
    """The machine of a run (from :func:`antibody_fast.info.environment`); ``torch_threads`` is the run's
    ``cfg.threads``."""
    env = environment(("torch", "transformers"))
    return {
        "cpu": env["cpu"]["model"],
        "cpu_count": env["cpu"]["logical_cores"],
        "torch_threads": cfg.threads,
        "python": env["python"],
        "torch": env["versions"]["torch"],
        "transformers": env["versions"]["transformers"],
        "platform": env["platform"],
    }


def markdown_table(header: list[str], align: str, cells: list[list[str]]) -> str:
    """A Markdown table: ``header`` names, ``align`` one character per column (``l`` or ``r``), rows of cells."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """The paper-shaped Markdown table of one run (one row per method)."""
    header = ["Method", "HS (%) ↓", "FA (%) ↑", "HS after alignment (%)", "P(refusal) after alignment",
              "Alignment time/step (ms)", "Fine-tuning time/step (ms)", "Adapter in fine-tuning"]  # fmt: skip
    cells = [
        [
            r["label"],
            f"{r['hs']:.1f}",
            f"{r['fa']:.1f}",
            f"{r['hs_aligned']:.1f}",
            f"{r['p_refuse_aligned']:.3f}",
            f"{r['align_ms']:.1f}",
            f"{r['finetune_ms']:.1f}",
            r["adapter_mode"],
        ]  # fmt: skip
        for r in rows
    ]
    return markdown_table(header, "lrrrrrrl", cells)


def spread(values: list[float], fmt: str = ".1f") -> str:
    lo, hi = min(values), max(values)
    mean = sum(values) / len(values)
    return f"{mean:{fmt}} [{lo:{fmt}}–{hi:{fmt}}]"


def format_summary_table(summary: list[dict]) -> str:
    """Several seeds: mean [min–max] per method, then the per-seed HS and FA."""
    header = ["Method", "HS (%) ↓ mean [min–max]", "FA (%) ↑ mean [min–max]", "P(refusal) after alignment",
              "HS per seed", "FA per seed", "Adapter in fine-tuning"]  # fmt: skip
    cells = [
        [
            r["label"],
            spread(r["hs"]),
            spread(r["fa"]),
            spread(r["p_refuse_aligned"], ".3f"),
            " / ".join(f"{x:.0f}" for x in r["hs"]),
            " / ".join(f"{x:.0f}" for x in r["fa"]),
            ADAPTER_MODE_OF[r["method"]],
        ]  # fmt: skip
        for r in summary
    ]
    return markdown_table(header, "lrrrlll", cells)


def write_report(
    cfg,
    report: dict,
    md: list[str],
    table: str,
    plots: Callable[[dict, str], list[str]],
    log: Callable[[str], None],
    also: str = "",
) -> dict:
    """Write ``report.md`` (``md`` plus the machine line), the plots and ``report.json`` into ``cfg.out``, log
    the table and the files; returns ``report`` with its ``files``."""
    md = [*md, "", machine_line(report["machine"], cfg, report["wall_s"]), ""]
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("\n".join(md))
    report["files"] = plots(report, cfg.out) + [
        os.path.join(cfg.out, n) for n in ("report.md", "report.json")
    ]
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    log("")
    log(table)
    log(f"\nwrote {', '.join(report['files'])}{also}  ({report['wall_s']:.0f} s)")
    sys.stdout.flush()
    return report


def config_dict(cfg) -> dict:
    """A config dataclass as JSON-ready dict (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def machine_line(machine: dict, cfg, wall_s: float) -> str:
    """The report's last line: CPU, cores, torch threads, torch version, wall time."""
    return (
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores, {cfg.threads} torch "
        f"thread{'s' if cfg.threads != 1 else ''}), "
        f"torch {machine['torch']}; wall {wall_s:.0f} s."
    )


def run_report(config: dict, machine: dict, base: dict, rows: list[dict], wall_s: float) -> dict:
    """The report of one run: its configuration, machine, base-model evaluation, one row per method, the
    ``results`` digest (HS, FA and HS after alignment per method) and the wall time."""
    return {
        "config": config,
        "machine": machine,
        "base": base,
        "methods": rows,
        "results": {r["method"]: {"hs": r["hs"], "fa": r["fa"], "hs_aligned": r["hs_aligned"]} for r in rows},
        "wall_s": wall_s,
    }


def seed_summary(cfg, seeds, reports: list[dict], wall_s: float) -> dict:
    """The summary of several single-seed ``reports`` of ``cfg``: per method the per-seed HS, FA, HS and
    P(refusal) after alignment, and the mean times per step."""
    rows = []
    for m in cfg.methods:
        per = [next(r for r in rep["methods"] if r["method"] == m) for rep in reports]
        rows.append(
            {
                "method": m,
                "label": METHOD_LABELS[m],
                **{key: [r[key] for r in per] for key in ("hs", "fa", "hs_aligned", "p_refuse_aligned")},
                "align_ms": sum(r["align_ms"] for r in per) / len(per),
                "finetune_ms": sum(r["finetune_ms"] for r in per) / len(per),
            }
        )
    return {
        "config": config_dict(cfg),
        "seeds": list(seeds),
        "machine": reports[0]["machine"],
        "methods": rows,
        "base": [rep["base"] for rep in reports],
        "per_seed": [os.path.join(f"seed_{k}", "report.json") for k in seeds],
        "wall_s": wall_s,
    }


def run_seeds(cfg, seeds, run_one: Callable[[object, int], dict], log: Callable[[str], None]) -> list[dict]:
    """The reports of ``run_one(config, seed)`` for each seed, each run with its own ``cfg.out/seed_<k>/``."""
    reports = []
    for k in seeds:
        log(f"\n=== seed {k} ===")
        sub = replace(cfg, seed=k, seeds=(), out=os.path.join(cfg.out, f"seed_{k}"))
        reports.append(run_one(sub, k))
    return reports


def write_seed_report(
    cfg, seeds, reports: list[dict], wall_s: float, title: str, scenario: str, log: Callable[[str], None]
) -> dict:
    """Write the :func:`seed_summary` of the per-seed ``reports`` (``report.md`` headed ``title``, the summary
    plot, ``report.json``) into ``cfg.out``; returns the summary."""
    summary = seed_summary(cfg, seeds, reports, wall_s)
    table = format_summary_table(summary["methods"])
    md = [
        f"# {title}",
        "",
        f"Seeds {', '.join(map(str, seeds))}; {scenario}. Per-seed reports and plots: `seed_<k>/`.",
        "",
        table,
    ]
    return write_report(cfg, summary, md, table, plot_summary, log, " and seed_<k>/")
