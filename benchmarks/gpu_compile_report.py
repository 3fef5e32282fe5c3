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
        f"- compiles: {len(results)} of the {meta['planned']} planned; with a violation: **{len(bad)}**",
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
    if meta["missing"]:
        lines += [
            f"**Incomplete run: {len(meta['missing'])} compiles were not reached before the time limit** (the "
            "CI set, a covering subset, comes first). Not compiled:",
            "",
            "<details><summary>list</summary>",
            "",
            *[f"- {m}" for m in meta["missing"]],
            "",
            "</details>",
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


# Assumed machine of the predictions (datasheet figures, not measured here): H100 SXM / H200, dense bf16.
PEAK_BF16 = 989e12  # FLOP/s
HBM_BW = {"H100 SXM": 3.35e12, "H200": 4.8e12}  # bytes/s
SMS = 132
EFFICIENCY = 0.75  # assumed sustained fraction of peak of a compute-bound Triton bf16 GEMM at 128-wide tiles


def _stage_cost(stage: str, N: int, V: int, H: int, chunk_f: int, chunk_b: int) -> tuple[float, float, str]:
    """(FLOPs, HBM bytes, the traffic counted) of one lm_head kernel over the whole op (all chunks), bf16.
    HBM bytes count each operand once (W is shared by the programs in flight, H fits in L2) plus the
    buffers the schedule adds."""
    mm = 2.0 * N * V * H
    n_fc = -(-V // chunk_f)
    n_bc = -(-V // chunk_b)
    if stage == "fwd":
        return mm, 2 * V * H + 2 * N * H + 2 * n_fc * N * 4 + N * 4, "W + H once, partials"
    if stage == "combine":
        return 0.0, 2 * n_fc * N * 4 + N * 16, "partials, LSE, label logit"
    if stage == "dz":
        return mm, 2 * V * H + 2 * N * H * n_bc + 2 * N * V, "W + H per chunk, dz written"
    if stage == "dh":
        return mm, 2 * N * V + 2 * V * H + 8 * N * H * n_bc, "dz, W, dH (fp32) read+written per chunk"
    if stage == "dw":
        return mm, 2 * N * V + 2 * N * H * n_bc + 2 * V * H, "dz, H per chunk, dW written"
    raise ValueError(stage)


def predictions_markdown() -> str:
    """Predicted cost of the fused lm_head kernels at the benchmark shapes (a roofline model: predictions to
    be checked by benchmarks/gpu_suite.sh, not measurements)."""
    slp = importlib.import_module("antibody_fast.ops.sequence_logprob")
    N, H = 4096, 4096
    lines = [
        "## Predicted cost of the fused lm_head op (model, not measured)",
        "",
        f"bf16, N = {N} scored rows, H = {H}; assumed H100 SXM / H200: {PEAK_BF16 / 1e12:.0f} TFLOP/s dense bf16, "
        f"HBM {HBM_BW['H100 SXM'] / 1e12:.2f} / {HBM_BW['H200'] / 1e12:.1f} TB/s, {SMS} SMs. "
        f"Time per kernel = max(FLOPs / ({EFFICIENCY:.2f} x peak), HBM bytes / bandwidth), where "
        f"{EFFICIENCY:.2f} is an assumed sustained fraction of a compute-bound Triton GEMM (not measured). "
        "Arithmetic intensity (AI) = FLOPs / HBM bytes; the ridge point is "
        f"{PEAK_BF16 / HBM_BW['H100 SXM']:.0f} FLOP/B (H100). Tile AI = FLOPs per byte loaded into shared memory "
        "by one program of the largest configuration (output tile a x b: a*b / (a+b)).",
        "",
        "| V | kernel | grid (programs) | GFLOP | HBM MB | AI (FLOP/B) | tile AI | predicted ms (H100) | "
        "expected fraction of bf16 peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for V in (32000, 128256):
        # launcher choices on a 132-SM GPU (the same arithmetic as fwd_chunk / bwd_chunk)
        row_tiles = -(-N // 128)
        want = -(-4 * SMS // row_tiles)
        chunk_f = max(256, (-(-V // want) // 256) * 256)
        chunk_b = min(max(256, (slp.DZ_BUDGET // (N * 2) // 256) * 256), -(-V // 256) * 256)
        n_fc = -(-V // chunk_f)
        total_t = total_f = 0.0
        for stage in ("fwd", "combine", "dz", "dh", "dw"):
            fl, by, _ = _stage_cost(stage, N, V, H, chunk_f, chunk_b)
            cfg = slp.LINEAR_CONFIGS.get(stage, {}).get("tc", [None])[-1]
            if stage == "fwd":
                grid = f"{row_tiles} x {n_fc} = {row_tiles * n_fc}"
            elif stage == "combine":
                grid = str(-(-N // slp.COMBINE_BLOCKS["cuda"][0]))
            elif stage == "dz":
                grid = f"{-(-N // cfg[0])} x {-(-chunk_b // cfg[1])} per chunk, {-(-V // chunk_b)} chunk(s)"
            elif stage == "dh":
                grid = f"{-(-N // cfg[0])} x {-(-H // cfg[2])} per chunk"
            else:
                grid = f"{-(-chunk_b // cfg[1])} x {-(-H // cfg[2])} per chunk"
            t = max(fl / (EFFICIENCY * PEAK_BF16), by / HBM_BW["H100 SXM"])
            total_t += t
            total_f += fl
            # output tile sides: fwd/dz BM x BV, dh BM x BK, dw BV x BK
            a, b = {"fwd": (0, 1), "dz": (0, 1), "dh": (0, 2), "dw": (1, 2)}.get(stage, (0, 1))
            tile_ai = f"{cfg[a] * cfg[b] / (cfg[a] + cfg[b]):.0f}" if cfg else "-"
            ai = f"{fl / by:.0f}" if fl else "0 (memory-bound)"
            frac = f"{fl / (t * PEAK_BF16):.0%}" if fl else "-"
            lines.append(
                f"| {V} | `{stage}` | {grid} | {fl / 1e9:.0f} | {by / 1e6:.0f} | {ai} | {tile_ai} | {t * 1e3:.3f} | "
                f"{frac} |"
            )
        useful = 3 * 2.0 * N * V * H  # logits, dH, dW: what a materialising implementation computes
        lines.append(
            f"| {V} | **fwd+bwd (trainable W)** | {5 if chunk_b >= V else 2 + 3 * -(-V // chunk_b)} launches | "
            f"{total_f / 1e9:.0f} | | | | {total_t * 1e3:.2f} | {total_f / (total_t * PEAK_BF16):.0%} executed, "
            f"{useful / (total_t * PEAK_BF16):.0%} of the 3 useful matmuls |"
        )
    lines += [
        "",
        "The recompute of the logits in the backward (the price of never materialising them) is a 4th matmul: "
        "even at the assumed GEMM efficiency the op reaches at most 3/4 of it on useful FLOPs. The frozen-lm_head "
        "case (no dW) drops the `dw` row.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--arch", type=int, nargs="+", default=list(gc.ARCHS))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--only", default="")
    ap.add_argument("--name", default=None, help="file stem (default gpu-compile-<date>)")
    ap.add_argument(
        "--time-limit", type=float, default=None, help="seconds; later compiles are reported missing"
    )
    a = ap.parse_args(argv)
    vs = [v for v in gc.variants() if a.only in f"{v.group} {v.kernel} {v.label}"]
    todo = gc.todo_for(vs, a.arch)  # the CI set first: a run cut by --time-limit still covers it
    t0 = time.perf_counter()
    got = gc.run(todo, a.jobs, progress=True, time_limit_s=a.time_limit)
    results = [r for r in got if r is not None]
    missing = [f"sm_{arch} `{v.kernel}`[{v.label}]" for (v, arch), r in zip(todo, got) if r is None]
    meta = {
        "date": dt.date.today().isoformat(),
        "triton": gc.triton_version(),
        "source_hash": gc.source_hash(),
        "jobs": a.jobs or gc.default_jobs(),
        "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), no GPU",
        "seconds": time.perf_counter() - t0,
        "archs": a.arch,
        "planned": len(todo),
        "missing": missing,
    }
    pred = predictions_markdown() if "lm_head" in {v.group for v in vs} else ""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.name or f"gpu-compile-{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(meta, results, pred) + "\n")
    bad = [r for r in results if r["violations"]]
    print(
        f"wrote {out / stem}.{{md,json}}: {len(results)} compiles, {len(bad)} with violations, {len(missing)} missing"
    )
    for r in bad:
        print(f"  sm_{r['arch']} {r['kernel']}[{r['label']}]: {'; '.join(r['violations'])}")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
