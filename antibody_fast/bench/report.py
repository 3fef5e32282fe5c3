"""Reports of a result document: the Markdown tables (:func:`render_markdown`), the PNG plot
(:func:`plot_results`) and the median-by-median comparison of two documents (:func:`compare_results`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .results import HEADER_KEY, Row, analyse, step_targets, summarise


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b} B"


def _fmt_ratio(x: float | None, suffix: str = "x") -> str:
    return "-" if x is None else (f"{x:.2f}x" if suffix else f"{x:.3g}")


def _header_lines(doc: dict) -> list[str]:
    h = doc.get(HEADER_KEY) or {}
    lines = []
    if h:
        dev = h.get("device_info") or {}
        lines.append(f"- device: `{dev.get('device', '?')}` {dev.get('device_name', '?')}")
        cpu = dev.get("cpu") or {}
        if cpu:
            lines.append(
                f"- CPU: {cpu.get('model')} ({cpu.get('logical_cores')} logical cores, "
                f"torch threads {cpu.get('torch_threads')})"
            )
        gpu = dev.get("gpu")
        if gpu:
            lines.append(
                f"- GPU: {gpu.get('name')} x{gpu.get('count')}, {gpu.get('memory_gib')} GiB, "
                f"{gpu.get('capability')}, CUDA {gpu.get('cuda')}"
            )
        lines.append(f"- date: {h.get('date', '?')}" + (" (quick mode)" if h.get("quick") else ""))
        v = h.get("versions") or {}
        lines.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
        if h.get("git_commit"):
            lines.append(f"- commit: {h['git_commit']}")
        fl = h.get("floors") or doc.get("antibody_fast_floors") or {}
        if fl:
            lines.append(
                "- measured floors: "
                + ", ".join(
                    f"{k} = {val:.4g}" if isinstance(val, float) else f"{k} = {val}" for k, val in fl.items()
                )
            )
        if h.get("merged_from"):
            lines.append("- merged from: " + ", ".join(f"`{Path(p).name}`" for p in h["merged_from"]))
        if h.get("interrupted"):
            lines.append(f"- **incomplete**: {h['interrupted']}; the cases that did not finish are missing")
        if h.get("command"):
            lines.append(f"- command: `{h['command']}`")
    else:
        mi = doc.get("machine_info") or {}
        lines.append(f"- machine: {mi.get('node', '?')} {(mi.get('cpu') or {}).get('brand_raw', '')}")
        lines.append(f"- date: {doc.get('datetime', '?')}")
    return lines


def render_markdown(doc: dict, title: str | None = None) -> str:
    """Markdown report of a result document: header, a side-by-side ratio table (one line per group) and
    the detailed table (one line per case)."""
    rows = [summarise(b) for b in doc["benchmarks"]]
    groups = analyse(rows)
    out = [f"# {title or 'antibody_fast benchmarks'}", ""]
    out += _header_lines(doc)
    out += [
        "",
        "Times: median of the rounds, with p20 and p80. *vs ours*: their median / our median (> 1: "
        "antibody_fast is faster). *limit*: physical floor time / our time (1.0 = at the device's limit; "
        "floor from the measured matmul rate and copy bandwidth). Peak memory: tensor bytes allocated "
        "beyond the inputs during one call.",
        "",
    ]
    if not rows:
        out.append("No benchmark ran.")
        return "\n".join(out) + "\n"

    # side-by-side ratios: one line per group with ours
    ratio_groups = [(g, m) for g, m in groups.items() if any(r.ours and not r.floor for r in m)]
    others = sorted({r.provider for _, m in ratio_groups for r in m if not r.ours and not r.floor})
    if ratio_groups and others:
        out += ["## Speed-up of antibody_fast, side by side", ""]
        cols = ["op", "mode", "shape", "dtype", "ours", "ours median", "limit"] + [f"vs {p}" for p in others]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for (op, mode, shape, dtype), members in ratio_groups:
            best = min((r for r in members if r.ours and not r.floor), key=lambda r: r.median)
            by_p = {r.provider: r for r in members}
            cells = [
                op,
                mode,
                shape,
                dtype,
                best.provider,
                fmt_time(best.median),
                _fmt_ratio(best.limit_frac, ""),
            ]
            cells += [_fmt_ratio(by_p[p].speedup) if p in by_p else "" for p in others]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")

    out += ["## All cases", ""]
    cols = [
        "op",
        "mode",
        "shape",
        "dtype",
        "provider",
        "median",
        "p20",
        "p80",
        "rounds",
        "vs ours",
        "limit",
        "peak mem",
        "mem vs ours",
        "notes",
    ]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "---|" * len(cols))
    for (op, mode, shape, dtype), members in groups.items():
        for r in members:
            notes = []
            if r.ours:
                notes.append("ours")
            if r.floor:
                notes.append("physical floor")
            if r.tokens_per_step and r.median > 0:
                notes.append(f"{r.tokens_per_step / r.median:,.0f} tokens/s")
            if r.launches is not None:
                notes.append(f"{r.launches} launches")
            if r.extra.get("note"):
                notes.append(str(r.extra["note"]))
            cells = [
                op,
                mode,
                shape,
                dtype,
                r.provider,
                fmt_time(r.median),
                fmt_time(r.p20),
                fmt_time(r.p80),
                str(r.rounds),
                _fmt_ratio(r.speedup),
                _fmt_ratio(r.limit_frac, ""),
                fmt_bytes(r.peak_mem),
                _fmt_ratio(r.mem_ratio),
                "; ".join(notes),
            ]
            out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    targets = step_targets(rows)
    if targets:
        out += [
            "",
            "## Training-step targets",
            "",
            "| configuration | target | measured | goal | met | providers |",
            "|---|---|---|---|---|---|",
        ]
        for t in targets:
            out.append(
                f"| {t['config']} | {t['target']} | {t['value']:.3f} | {t['goal']} | "
                f"{'yes' if t['met'] else '**no**'} | {' / '.join(t['providers'])} |"
            )
    matrices = [(g, m) for g, m in groups.items() if "step" in g[0].lower() and len(m) >= 2]
    for (op, mode, shape, dtype), members in matrices:
        members = [r for r in members if math.isfinite(r.median) and r.median > 0]
        out += [
            "",
            f"## Time ratios: {' '.join(x for x in (op, mode, shape, dtype) if x)}",
            "",
            "Row provider's median / column provider's median.",
            "",
        ]
        out.append("| | " + " | ".join(r.provider for r in members) + " |")
        out.append("|" + "---|" * (len(members) + 1))
        for a in members:
            out.append(
                f"| {a.provider} | " + " | ".join(f"{a.median / b.median:.2f}" for b in members) + " |"
            )
    for key, heading in (("failed", "Failed"), ("skipped", "Skipped")):
        items = (doc.get(HEADER_KEY) or {}).get(key) or []
        if items:
            out += ["", f"## {heading}", ""]
            out += [f"- {s}" for s in items]
    return "\n".join(out) + "\n"


def plot_results(doc: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """PNG plot (matplotlib, Agg backend): median time of every case (log scale, p20-p80 error bars) and,
    where a group has *ours*, our speed-up against each other provider."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = [summarise(b) for b in doc["benchmarks"]]
    groups = analyse(rows)
    ordered = [r for members in groups.values() for r in members if math.isfinite(r.median) and r.median > 0]
    ratios = [r for r in ordered if r.speedup is not None]
    n_panels = 2 if ratios else 1
    heights = [max(1.5, 0.3 * len(ordered) + 1.0)] + ([max(1.5, 0.3 * len(ratios) + 1.0)] if ratios else [])
    fig, axes = plt.subplots(
        n_panels,
        1,
        figsize=(11, min(sum(heights) + 0.8, 80)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    providers = sorted({r.provider for r in ordered})
    cmap = plt.get_cmap("tab10")
    color = {p: cmap(i % 10) for i, p in enumerate(providers)}

    def label(r: Row) -> str:
        shape = r.shape if len(r.shape) <= 32 else r.shape[:30] + ".."
        return " ".join(x for x in (r.op, r.mode, shape, r.dtype, r.provider) if x)

    ax = axes[0][0]
    if ordered:
        y = list(range(len(ordered)))
        med = [r.median * 1e3 for r in ordered]
        lo = [max(0.0, (r.median - r.p20) * 1e3) if math.isfinite(r.p20) else 0.0 for r in ordered]
        hi = [max(0.0, (r.p80 - r.median) * 1e3) if math.isfinite(r.p80) else 0.0 for r in ordered]
        ax.barh(y, med, xerr=[lo, hi], color=[color[r.provider] for r in ordered])
        ax.set_yticks(y)
        ax.set_yticklabels([label(r) for r in ordered], fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_yaxis()
    ax.set_xlabel("median time [ms] (bars: p20-p80)")
    ax.set_title("time per call")
    if ratios:
        ax = axes[1][0]
        y = list(range(len(ratios)))
        ax.barh(y, [r.speedup for r in ratios], color=[color[r.provider] for r in ratios])
        ax.axvline(1.0, color="black", lw=0.8)
        vals = [r.speedup for r in ratios if r.speedup > 0]
        if vals and max(vals) / min(vals) > 20:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(y)
        ax.set_yticklabels([label(r) for r in ratios], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("their time / our time (> 1: antibody_fast faster)")
        ax.set_title("speed-up of antibody_fast")
    h = doc.get(HEADER_KEY) or {}
    dev = (h.get("device_info") or {}).get("device_name", "")
    fig.suptitle(title or f"antibody_fast benchmarks {dev} {h.get('date', '')}".strip(), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_results(old: dict, new: dict) -> str:
    """Text table of the change of every benchmark's median between two result documents, matched by
    ``fullname`` (falling back to ``name``). Change = new / old - 1 (negative: faster)."""

    def index(doc):
        rows = [summarise(b) for b in doc["benchmarks"]]
        by_full = {r.fullname: r for r in rows}
        by_name = {r.name: r for r in rows}
        return rows, by_full, by_name

    old_rows, old_full, old_name = index(old)
    new_rows, _, _ = index(new)
    lines = [f"{'benchmark':<70} {'old median':>12} {'new median':>12} {'change':>9}"]
    matched = set()
    n_faster = n_slower = 0
    for r in new_rows:
        o = old_full.get(r.fullname) or old_name.get(r.name)
        if o is None:
            lines.append(f"{r.fullname[:70]:<70} {'-':>12} {fmt_time(r.median):>12} {'new':>9}")
            continue
        matched.add(o.fullname)
        if o.median > 0 and math.isfinite(o.median) and math.isfinite(r.median):
            ch = r.median / o.median - 1.0
            n_faster += ch < -0.05
            n_slower += ch > 0.05
            ch_s = f"{ch * 100:+.1f}%"
        else:
            ch_s = "?"
        lines.append(f"{r.fullname[:70]:<70} {fmt_time(o.median):>12} {fmt_time(r.median):>12} {ch_s:>9}")
    for o in old_rows:
        if o.fullname not in matched:
            lines.append(f"{o.fullname[:70]:<70} {fmt_time(o.median):>12} {'-':>12} {'removed':>9}")
    lines.append(f"{len(matched)} matched: {n_faster} faster and {n_slower} slower by more than 5%")
    return "\n".join(lines)
