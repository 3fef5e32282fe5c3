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
helpers (:func:`measure_peak_memory`, :func:`time_benchmark`, :func:`measure_matmul_tflops`,
:func:`measure_copy_gbps`, :func:`floor_seconds`) as fixtures.

``--compare OLD.json`` prints the change of every benchmark's median (matched by name) against an older
result file and exits 0 (with ``--from-json NEW.json`` it compares two files without running anything).

Modules: :mod:`~antibody_fast.bench.measure` (what the suites call while they run),
:mod:`~antibody_fast.bench.results` (result documents: rows, groups, ratios, step targets),
:mod:`~antibody_fast.bench.report` (Markdown, PNG, comparison) and :mod:`~antibody_fast.bench.runner` (the
command). The machine and versions in the header come from :func:`antibody_fast.info.environment`.
"""

from __future__ import annotations

from .measure import (
    DEVICE_ENV,
    QUICK_ENV,
    bench_device,
    floor_seconds,
    measure_copy_gbps,
    measure_matmul_tflops,
    measure_peak_memory,
    quick_mode,
    tag_benchmark,
    time_benchmark,
)
from .report import compare_results, fmt_bytes, fmt_time, plot_results, render_markdown
from .results import (
    HEADER_KEY,
    OURS_PROVIDERS,
    STEP_TARGETS,
    Row,
    analyse,
    is_floor,
    is_ours,
    load_results,
    merge_results,
    step_role,
    step_targets,
    summarise,
)
from .runner import default_bench_dir, device_info, main, pytest_command, slugify, versions

__all__ = [
    "DEVICE_ENV",
    "HEADER_KEY",
    "OURS_PROVIDERS",
    "QUICK_ENV",
    "STEP_TARGETS",
    "Row",
    "analyse",
    "bench_device",
    "compare_results",
    "default_bench_dir",
    "device_info",
    "floor_seconds",
    "fmt_bytes",
    "fmt_time",
    "is_floor",
    "is_ours",
    "load_results",
    "main",
    "measure_copy_gbps",
    "measure_matmul_tflops",
    "measure_peak_memory",
    "merge_results",
    "plot_results",
    "pytest_command",
    "quick_mode",
    "render_markdown",
    "slugify",
    "step_role",
    "step_targets",
    "summarise",
    "tag_benchmark",
    "time_benchmark",
    "versions",
]
