"""``antibody-fast bench``: run the pytest-benchmark suites under ``benchmarks/`` and report them.

Usage::

    antibody-fast bench [--quick] [--device auto|cpu|cuda] [--only PATTERN] [--out DIR]
                        [--compare OLD.json] [--from-json RESULTS.json] [-- PYTEST_ARGS...]

One run writes, under ``--out`` (default ``benchmarks/results``), three files named
``<device-slug>-<date>[-quick]``:

* ``.json``: the raw pytest-benchmark JSON (every round's timing kept in ``stats.data``) plus a header
  under the key ``"antibody_fast"``: device name, date, versions (torch, triton, transformers, ...),
  CPU model and core count or GPU name, the measured floors, the command line;
* ``.md``: Markdown tables (median, p20, p80 from the raw round timings; our speed-up against every other
  provider of the same group; peak memory; the fraction of the physical limit reached);
* ``.png``: a plot of the median times and of the speed-ups.

How the benchmark files talk to the runner: each case sets ``benchmark.extra_info`` keys ``op``,
``provider``, ``mode``, ``shape``, ``dtype``, ``device`` and, where measured, ``peak_mem_bytes``,
``launches``, ``tokens_per_step``, ``floor_s``. Cases are grouped by ``(op, mode, shape, dtype)``.
In a group:

* *ours* is the case whose ``extra_info["ours"]`` is true, or, without that key, whose provider is ``ours``,
  ``antibody_fast``, ``cpp`` or ``triton`` (or starts with ``ours``); every other provider's ratio is
  ``their median / our median`` (> 1: we are faster);
* a *floor* case (a provider whose name contains ``floor``, e.g. ``matmul-floor``) is the time of the
  unavoidable work on this device (bare matmuls, one streaming copy); a case may instead give its floor
  directly as ``extra_info["floor_s"]`` (seconds, e.g. from :func:`floor_seconds`). The physical-limit
  column is ``floor time / our time`` (1.0 = at the limit).

The suites read ``ANTIBODY_FAST_BENCH_QUICK`` (``1`` in quick mode: small shapes, few rounds) and
``ANTIBODY_FAST_BENCH_DEVICE`` (``cpu`` or ``cuda``). ``benchmarks/conftest.py`` wraps the measurement
helpers of this module (:func:`measure_peak_memory`, :func:`time_benchmark`, :func:`measure_matmul_tflops`,
:func:`measure_copy_gbps`, :func:`floor_seconds`) as fixtures.

``--compare OLD.json`` prints the change of every benchmark's median (matched by name) against an older
result file and exits 0 (with ``--from-json NEW.json`` it compares two files without running anything).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib.metadata as _md
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

QUICK_ENV = "ANTIBODY_FAST_BENCH_QUICK"
DEVICE_ENV = "ANTIBODY_FAST_BENCH_DEVICE"
HEADER_KEY = "antibody_fast"
OURS_PROVIDERS = ("ours", "antibody_fast", "antibody-fast", "cpp", "triton")
_VERSIONED = (
    "torch",
    "triton",
    "transformers",
    "peft",
    "accelerate",
    "liger-kernel",
    "cut-cross-entropy",
    "pytest-benchmark",
    "numpy",
)


# --------------------------------------------------------------------------------------------------------
# Environment of a run
# --------------------------------------------------------------------------------------------------------


def quick_mode() -> bool:
    """True when ``ANTIBODY_FAST_BENCH_QUICK`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get(QUICK_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def bench_device() -> str:
    """The device the suites run on: ``ANTIBODY_FAST_BENCH_DEVICE`` (``cpu`` or ``cuda``), default ``cpu``."""
    dev = os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={dev!r}: expected 'cpu' or 'cuda'")
    return dev


def _pkg_version(pkg: str) -> str | None:
    try:
        return _md.version(pkg)
    except _md.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def slugify(text: str) -> str:
    """``"Intel(R) Xeon(R) Gold 6430"`` -> ``"Intel-Xeon-Gold-6430"``; ``"NVIDIA H100 80GB HBM3"`` ->
    ``"NVIDIA-H100-80GB-HBM3"``."""
    text = re.sub(r"\((R|TM|tm|r)\)", "", text)
    text = re.sub(r"\bCPU\b|@.*$", "", text)
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-.") or "unknown"


def device_info(device: str) -> dict:
    """Header describing the machine: ``{"device", "device_name", "slug", "cpu": {...}, "gpu": {...}|None}``.

    Only ``device="cuda"`` queries CUDA."""
    import torch

    cpu = {
        "model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    gpu = None
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: CUDA is not available on this machine")
        p = torch.cuda.get_device_properties(0)
        gpu = {
            "name": p.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"sm_{p.major}{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "cuda": torch.version.cuda,
        }
        name = p.name
    else:
        name = cpu["model"]
    return {
        "device": device,
        "device_name": name,
        "slug": f"{device}-{slugify(name)}",
        "cpu": cpu,
        "gpu": gpu,
    }


def versions() -> dict:
    """Versions of python, antibody_fast and the libraries the figures depend on (``None``: not installed)."""
    import torch

    from . import __version__

    out = {"python": platform.python_version(), "antibody_fast": __version__}
    for pkg in _VERSIONED:
        out[pkg] = torch.__version__ if pkg == "torch" else _pkg_version(pkg)
    return out


def _git_commit(root: Path) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


# --------------------------------------------------------------------------------------------------------
# Measurement helpers used by the suites (through benchmarks/conftest.py)
# --------------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure_peak_memory(fn: Callable[[], object], device: str) -> int:
    """Peak bytes of tensor memory that one call of ``fn()`` allocates on ``device`` beyond what was
    already allocated when it started (its working set, inputs excluded, outputs included).

    * CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the call (the
      caching allocator's *allocated*, not reserved, bytes).
    * CPU: the call runs under ``torch.profiler.profile(profile_memory=True)``; every allocation and free of
      the CPU allocator is recorded with its time stamp, and the peak of their running sum is returned.
      This counts torch tensor storage only (not Python objects nor library scratch memory outside the
      torch allocator); it is the same quantity as the CUDA figure, so the two are comparable.

    Run it outside the timed region: the profiler slows the call down. Returns an ``int`` (bytes, >= 0).
    """
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return max(int(peak), 0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    # CPU allocations only (device_type 0 is CPU in c10::DeviceType)
    events = [e for e in events if int(e.device_type()) == 0]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += int(e.nbytes())
        peak = max(peak, live)
    return peak


def time_benchmark(
    benchmark,
    fn: Callable[[], object],
    *,
    device: str,
    setup: Callable[[], object] | None = None,
    rounds: int | None = None,
    warmup_rounds: int | None = None,
    quick: bool | None = None,
):
    """Time ``fn()`` with the pytest-benchmark fixture ``benchmark`` and return one result of ``fn``.

    * CPU: ``benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)``
      (defaults: 10 rounds + 2 warm-up rounds, 3 + 1 in quick mode).
    * CUDA without ``setup``: ``triton.testing.do_bench(fn, return_mode="all")`` (CUDA events around every
      call, L2 cache flushed between calls; 25/100 ms warm-up/measurement, 10/25 ms in quick mode); its
      per-call times become the benchmark's rounds, so the JSON's ``stats.data`` holds device times;
      calls too long for ``rounds`` samples in that window get the missing rounds timed with CUDA events.
      ``extra_info["timer"]`` says which timer was used.
    * CUDA with ``setup`` (or without triton): pedantic rounds of ``fn(); torch.cuda.synchronize()`` timed
      on the host (each round includes one synchronisation, a few microseconds).
    """
    quick = quick_mode() if quick is None else quick
    if rounds is None:
        rounds = 3 if quick else 10
    if warmup_rounds is None:
        warmup_rounds = 1 if quick else 2
    is_cuda = str(device).startswith("cuda")
    if not is_cuda:
        benchmark.extra_info.setdefault("timer", "host")
        return benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
    do_bench = None
    if setup is None and hasattr(benchmark, "_make_stats") and not getattr(benchmark, "disabled", False):
        try:
            from triton.testing import do_bench
        except Exception:  # pragma: no cover - triton missing on a CUDA machine
            do_bench = None
    if do_bench is None:

        def synced(*args, **kwargs):
            out = fn(*args, **kwargs)
            _sync(device)
            return out

        benchmark.extra_info.setdefault("timer", "host+cuda-sync")
        return benchmark.pedantic(synced, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
    if getattr(benchmark, "_mode", None):
        raise RuntimeError(f"the benchmark fixture was already used ({benchmark._mode})")
    warm_ms, rep_ms = (10, 25) if quick else (25, 100)
    times_ms = [float(t) for t in do_bench(fn, warmup=warm_ms, rep=rep_ms, return_mode="all")]
    if len(times_ms) < rounds:  # long calls (training steps): do_bench ran too few; time the rest here
        times_ms += _cuda_event_times_ms(fn, rounds - len(times_ms))
    # Record do_bench's per-call device times as this benchmark's rounds (pytest-benchmark has no public
    # API for externally measured times; _make_stats is what pedantic() itself uses).
    benchmark._mode = "triton.testing.do_bench"
    stats = benchmark._make_stats(1)
    for t in times_ms:
        stats.update(float(t) / 1e3)
    benchmark.extra_info.setdefault("timer", "cuda-events(triton.testing.do_bench)")
    out = fn()
    _sync(device)
    return out


def _cuda_event_times_ms(fn: Callable[[], object], n: int) -> list[float]:
    import torch

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def tag_benchmark(
    benchmark,
    *,
    op: str,
    provider: str,
    mode: str = "",
    shape=None,
    dtype=None,
    device: str | None = None,
    **extra,
) -> None:
    """Set the ``benchmark.extra_info`` keys the runner reads. ``shape``: tuple/list/dict/str;
    ``dtype``: a torch dtype or its name; ``extra``: e.g. ``peak_mem_bytes``, ``launches``,
    ``tokens_per_step``, ``floor_s``, ``ours=True``, ``note``."""
    info = {
        "op": op,
        "provider": provider,
        "mode": mode,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "device": device or bench_device(),
    }
    info.update(extra)
    benchmark.extra_info.update(info)


def _best_time(fn: Callable[[], object], device: str, reps: int) -> float:
    """Shortest of ``reps`` timed calls after one warm-up call, in seconds (CUDA events on CUDA)."""
    import torch

    is_cuda = str(device).startswith("cuda")
    fn()
    _sync(device)
    best = math.inf
    for _ in range(reps):
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul_tflops(device: str, dtype=None, *, quick: bool | None = None) -> float:
    """The device's measured dense matmul rate in TFLOP/s (best of several square ``n x n @ n x n``
    matmuls, ``2 n^3`` flops each). Defaults: fp32 on CPU (n=2048, 1024 in quick mode), bf16 on CUDA
    (n=8192, 4096 in quick mode). Cached per process and arguments."""
    import torch

    is_cuda = str(device).startswith("cuda")
    if dtype is None:
        dtype = torch.bfloat16 if is_cuda else torch.float32
    return _matmul_tflops(str(device), dtype, quick_mode() if quick is None else bool(quick))


@functools.cache
def _matmul_tflops(device: str, dtype, quick: bool) -> float:
    import torch

    is_cuda = device.startswith("cuda")
    n = (4096 if quick else 8192) if is_cuda else (1024 if quick else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    reps = 20 if is_cuda else (2 if quick else 4)
    t = _best_time(lambda: torch.mm(a, b), device, reps)
    return 2.0 * n**3 / t / 1e12


def measure_copy_gbps(device: str, *, quick: bool | None = None) -> float:
    """The device's measured copy bandwidth in GB/s (1e9 bytes/s), counting bytes read plus bytes written
    by ``dst.copy_(src)`` over a buffer far larger than the caches (best of several copies): 256 MiB on
    CPU (64 MiB in quick mode), 1 GiB on CUDA (256 MiB in quick mode). Cached per process and arguments."""
    return _copy_gbps(str(device), quick_mode() if quick is None else bool(quick))


@functools.cache
def _copy_gbps(device: str, quick: bool) -> float:
    import torch

    is_cuda = device.startswith("cuda")
    nbytes = (256 if quick else 1024) * 2**20 if is_cuda else (64 if quick else 256) * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    reps = 20 if is_cuda else (3 if quick else 5)
    t = _best_time(lambda: dst.copy_(src), device, reps)
    return 2.0 * nbytes / t / 1e9


def floor_seconds(
    device: str, dtype=None, *, flops: float = 0.0, bytes_moved: float = 0.0, quick: bool | None = None
) -> float:
    """Physical floor of a piece of work on ``device``: ``max(flops / matmul rate, bytes / copy bandwidth)``
    with the rates of :func:`measure_matmul_tflops` (in ``dtype``) and :func:`measure_copy_gbps`.
    ``flops``: matmul flops the op cannot avoid; ``bytes_moved``: bytes it must read plus write."""
    if flops < 0 or bytes_moved < 0:
        raise ValueError("flops and bytes_moved must be >= 0")
    t = 0.0
    if flops:
        t = max(t, flops / (measure_matmul_tflops(device, dtype, quick=quick) * 1e12))
    if bytes_moved:
        t = max(t, bytes_moved / (measure_copy_gbps(device, quick=quick) * 1e9))
    return t


# --------------------------------------------------------------------------------------------------------
# Reading results
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Running the suites
# --------------------------------------------------------------------------------------------------------


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_bench_dir() -> Path:
    """``./benchmarks`` when the current directory has one with bench files, else the repository's."""
    here = Path.cwd() / "benchmarks"
    if here.is_dir() and any(here.glob("bench_*.py")):
        return here
    return _repo_root() / "benchmarks"


def pytest_command(
    bench_dir: Path, json_path: Path, *, only: str | None, quick: bool, extra: Sequence[str] = ()
) -> list[str]:
    """The pytest command line the runner executes (in a subprocess)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(bench_dir),
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "--benchmark-sort=fullname",
        "--override-ini",
        "python_files=bench_*.py",
        "--override-ini",
        "python_functions=test_* bench_*",
        "--override-ini",
        f"testpaths={bench_dir}",
        "-q",
    ]
    if quick:
        cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.2", "--benchmark-warmup=off"]
    else:
        cmd += ["--benchmark-min-rounds=5", "--benchmark-max-time=1.0"]
    if only:
        cmd += ["-k", only]
    return cmd + list(extra)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="antibody-fast bench",
        description="Run the pytest-benchmark suites under benchmarks/ and write <device>-<date>.json "
        "(raw timings + header), .md (tables: median, p20, p80, speed-ups, peak memory, physical-limit "
        "fraction) and .png (plot).",
        epilog="Arguments after `--` go to pytest unchanged.",
    )
    p.add_argument(
        "--quick", action="store_true", help="small shapes and few rounds (sets ANTIBODY_FAST_BENCH_QUICK=1)"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device the suites run on (sets ANTIBODY_FAST_BENCH_DEVICE; auto: cuda when available)",
    )
    p.add_argument(
        "--only",
        metavar="PATTERN",
        help="run only matching cases (a pytest -k expression over file, test and parameter names, "
        "e.g. 'flat' or 'sequence_logprob and not compile')",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: benchmarks/results)")
    p.add_argument(
        "--bench-dir", metavar="DIR", help="folder holding the bench_*.py files (default: benchmarks/)"
    )
    p.add_argument("--compare", metavar="OLD.json", help="print the change of every median against OLD.json")
    p.add_argument(
        "--from-json",
        metavar="RESULTS.json",
        nargs="+",
        help="run nothing: write the .md and .png of existing result files (several are merged into one "
        "report) and --compare them",
    )
    p.add_argument("--name", metavar="STEM", help="file stem instead of <device-slug>-<date>[-quick]")
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="interrupt the suites after SECONDS and report the cases that finished",
    )
    return p


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _write_reports(doc: dict, json_path: Path) -> tuple[Path, Path | None]:
    """Write the .md and .png next to ``json_path``; the PNG is skipped (with a note) without matplotlib
    (GPU machines may not have it: regenerate it elsewhere with ``--from-json``)."""
    md_path = json_path.with_suffix(".md")
    png_path = json_path.with_suffix(".png")
    md_path.write_text(render_markdown(doc))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            f"[bench] matplotlib is not installed: no plot (run `antibody-fast bench --from-json {json_path}` "
            "where it is)",
            file=sys.stderr,
        )
        return md_path, None
    plot_results(doc, png_path)
    return md_path, png_path


def _default_sigint() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_pytest(cmd: list[str], env: dict, cwd: Path, time_limit: float | None) -> tuple[int, str | None]:
    """Run pytest; return ``(exit status, why it was interrupted or None)``. Past ``time_limit`` seconds
    pytest gets SIGINT (it then ends the session and pytest-benchmark writes the JSON of the finished cases)
    and is killed 60 s later if it still runs. On Ctrl-C / SIGINT to the process group (e.g. from an outer
    ``timeout -s INT``) pytest got the signal too and is given 15 s to do the same.

    pytest starts with SIGINT at its default disposition even when this process ignores it (a background job
    of a non-interactive shell, ``nohup``): Python only turns SIGINT into KeyboardInterrupt, which pytest needs
    to end the session and write the finished cases, when SIGINT is not ignored at startup."""
    proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), preexec_fn=_default_sigint)
    try:
        return proc.wait(timeout=time_limit), None
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        grace, why = 60, f"--time-limit {time_limit:g} s reached"
    except KeyboardInterrupt:
        grace, why = 15, "interrupted (SIGINT)"
    try:
        return proc.wait(timeout=grace), why
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        return proc.wait(), why


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``antibody-fast bench``. Returns the exit status: 0 when every benchmark ran, pytest's
    status otherwise (reports are still written for the cases that ran), 2 for bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, passthrough = _split_passthrough(argv)
    parser = _parser()
    args = parser.parse_args(own)

    old_doc = None
    if args.compare:
        try:
            old_doc = load_results(args.compare)
        except (OSError, ValueError) as e:
            parser.error(f"--compare: {e}")

    if args.from_json:
        docs = []
        for path in args.from_json:
            try:
                docs.append(load_results(path))
            except (OSError, ValueError) as e:
                parser.error(f"--from-json: {e}")
        doc = merge_results(docs, [str(p) for p in args.from_json])
        first = Path(args.from_json[0])
        stem = args.name or (first.stem if len(docs) == 1 else first.stem + "-merged")
        out_dir = Path(args.out) if args.out else first.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / f"{stem}.json"
        if len(docs) > 1 or json_path.resolve() != first.resolve():
            json_path.write_text(json.dumps(doc, indent=1))
        md_path, png_path = _write_reports(doc, json_path)
        print(f"[bench] wrote {md_path}" + (f" and {png_path}" if png_path else ""))
        if old_doc is not None:
            print(compare_results(old_doc, doc))
        return 0

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    bench_dir = Path(args.bench_dir) if args.bench_dir else default_bench_dir()
    if not bench_dir.is_dir():
        parser.error(f"benchmark folder not found: {bench_dir} (use --bench-dir)")
    if not any(bench_dir.glob("bench_*.py")):
        parser.error(f"no bench_*.py files in {bench_dir}")
    try:
        info = device_info(device)
    except RuntimeError as e:
        parser.error(str(e))
    out_dir = Path(args.out) if args.out else bench_dir / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    stem = args.name or f"{info['slug']}-{now:%Y-%m-%d}" + ("-quick" if args.quick else "")
    json_path = out_dir / f"{stem}.json"
    raw_path = out_dir / f".{stem}.raw.json"
    if raw_path.exists():
        raw_path.unlink()

    env = dict(os.environ)
    env[QUICK_ENV] = "1" if args.quick else "0"
    env[DEVICE_ENV] = device
    if device == "cpu":
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    cmd = pytest_command(bench_dir, raw_path, only=args.only, quick=args.quick, extra=passthrough)
    print(f"[bench] device {device}: {info['device_name']}; quick={args.quick}")
    print("[bench] " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    rc, interrupted = _run_pytest(cmd, env, bench_dir.parent, args.time_limit)
    wall = time.perf_counter() - t0
    if interrupted:
        print(f"[bench] {interrupted}: reporting the cases that finished", file=sys.stderr)
    if rc == 5:
        print(
            f"[bench] no benchmark matched (pytest exit 5){' for --only ' + repr(args.only) if args.only else ''}",
            file=sys.stderr,
        )
        return 5
    if not raw_path.is_file():
        print(f"[bench] pytest exited with {rc} and wrote no results", file=sys.stderr)
        return rc or 1
    with open(raw_path) as f:
        doc = json.load(f)
    raw_path.unlink()
    doc[HEADER_KEY] = {
        "device_info": info,
        "date": now.isoformat(timespec="seconds"),
        "versions": versions(),
        "quick": bool(args.quick),
        "only": args.only,
        "floors": doc.pop("antibody_fast_floors", None) or {},
        "skipped": doc.pop("antibody_fast_skipped", None) or [],
        "failed": doc.pop("antibody_fast_failed", None) or [],
        "command": "antibody-fast bench " + shlex.join(argv),
        "pytest_exit_code": rc,
        "interrupted": interrupted,
        "wall_s": round(wall, 1),
        "git_commit": _git_commit(_repo_root()),
    }
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    md_path, png_path = _write_reports(doc, json_path)
    print(
        f"[bench] {len(doc['benchmarks'])} benchmarks in {wall:.0f} s; wrote {json_path}, {md_path.name}"
        + (f", {png_path.name}" if png_path else "")
    )
    if rc != 0:
        print(
            f"[bench] pytest exited with {rc}: some benchmarks failed (see above); the reports hold those "
            "that ran",
            file=sys.stderr,
        )
    if old_doc is not None:
        print(compare_results(old_doc, doc))
    return rc


if __name__ == "__main__":
    sys.exit(main())
