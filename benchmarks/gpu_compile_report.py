"""Compile every Triton kernel of antibody_fast for sm_80 and sm_90 (no GPU needed) and write a report.

Usage: python benchmarks/gpu_compile_report.py [--out benchmarks/results] [--arch 80 90] [--jobs N]
                                               [--only SUBSTR]

Writes ``<out>/gpu-compile-<date>.md`` and ``.json``: registers, spills, shared memory and the tensor-core
instructions of each kernel x specialization x architecture (antibody_fast/gpu_compile.py), the violations,
and the predicted cost of the lm_head kernels at the benchmark shapes (a model, not a measurement).
Exit status 1 when any compile has a violation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import platform
import sys
import time
from pathlib import Path

gc = importlib.import_module("antibody_fast.gpu_compile")


def _mma(r: dict) -> str:
    ops = r.get("mma") or {}
    if not ops:
        return "-"
    return ", ".join(f"{k} x{n}" for k, n in sorted(ops.items()))


def _row(r: dict) -> str:
    if not r.get("ok"):
        return f"| `{r['kernel']}` | {r['label']} | sm_{r['arch']} | - | - | - | - | FAILED |"
    status = "; ".join(r["violations"]) or "ok"
    return (
        f"| `{r['kernel']}` | {r['label']} | sm_{r['arch']} | {r['registers']} | "
        f"{r['spill_stores']}/{r['spill_loads']} | {r['shared'] / 1024:.0f} | {_mma(r)} | {status} |"
    )


def markdown(meta: dict, results: list[dict], predictions: str) -> str:
    bad = [r for r in results if r["violations"]]
    tc = [r for r in results if r["matmul_tc"]]
    lines = [
        f"# GPU compile report, {meta['date']}",
        "",
        f"Triton {meta['triton']} (`triton.compile` to cubin for `cuda` sm_80 / sm_90a; nothing launched, no GPU "
        f"used), kernel sources {meta['source_hash']}, {meta['jobs']} worker(s) on {meta['machine']}: "
        f"{meta['seconds']:.0f} s wall for {len(results)} compiles.",
        "",
        f"- compiles: {len(results)}; with a violation: **{len(bad)}**",
        f"- spills: {sum(1 for r in results if (r.get('spill_stores') or 0) + (r.get('spill_loads') or 0))}; "
        f"shared memory over the limit (sm_80 163 KiB, sm_90 227 KiB): "
        f"{sum(1 for r in results if any('shared memory' in v for v in r['violations']))}",
        f"- fp16/bf16 matmul compiles: {len(tc)}, with tensor-core instructions: "
        f"{sum(1 for r in tc if r.get('mma'))} (HMMA = mma.sync, HGMMA = wgmma)",
        f"- highest register count: {max((r.get('registers') or 0) for r in results)}",
        "",
        "Columns: registers per thread, spill stores / loads in bytes (ptxas -v), shared memory a launch asks "
        "for (KiB), tensor-core instructions in the SASS (cuobjdump -sass) with their static count.",
        "",
    ]
    if predictions:
        lines += [predictions, ""]
    for group in dict.fromkeys(r["group"] for r in results):
        lines += [
            f"## {group}",
            "",
            "| kernel | specialization | arch | regs | spill st/ld (B) | smem (KiB) | tensor cores | status |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [_row(r) for r in results if r["group"] == group]
        lines.append("")
    return "\n".join(lines)


def predictions_markdown() -> str:
    """The predicted cost table of the lm_head kernels, when the launcher module provides one."""
    slp = importlib.import_module("antibody_fast.ops.sequence_logprob")
    fn = getattr(slp, "gpu_cost_model", None)
    if fn is None:
        return ""
    return fn()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--arch", type=int, nargs="+", default=list(gc.ARCHS))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--only", default="")
    ap.add_argument("--name", default=None, help="file stem (default gpu-compile-<date>)")
    a = ap.parse_args(argv)
    vs = [v for v in gc.variants() if a.only in f"{v.group} {v.kernel} {v.label}"]
    todo = gc.todo_for(vs, a.arch)
    t0 = time.perf_counter()
    results = gc.run(todo, a.jobs, progress=True)
    meta = {
        "date": dt.date.today().isoformat(),
        "triton": gc.triton_version(),
        "source_hash": gc.source_hash(),
        "jobs": a.jobs or gc.default_jobs(),
        "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), no GPU",
        "seconds": time.perf_counter() - t0,
        "archs": a.arch,
    }
    pred = predictions_markdown()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.name or f"gpu-compile-{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(meta, results, pred) + "\n")
    bad = [r for r in results if r["violations"]]
    print(f"wrote {out / stem}.{{md,json}}: {len(results)} compiles, {len(bad)} with violations")
    for r in bad:
        print(f"  sm_{r['arch']} {r['kernel']}[{r['label']}]: {'; '.join(r['violations'])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
