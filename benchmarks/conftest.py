"""Shared fixtures of the benchmark suites (run them with ``antibody-fast bench``; see antibody_fast/bench/).

Environment (set by the runner):

* ``ANTIBODY_FAST_BENCH_DEVICE`` = ``cpu`` (default) or ``cuda``: the device every suite runs on. Cases
  marked ``gpu`` run only with ``cuda``; with ``cuda`` requested on a machine without CUDA everything skips.
* ``ANTIBODY_FAST_BENCH_QUICK`` = ``1``: small shapes and few rounds, so a whole run takes seconds.

Fixtures:

* ``bench_device`` (str), ``quick`` (bool), ``bench_dtype`` (``torch.float32`` on CPU, ``torch.bfloat16`` on
  CUDA: bf16 matmuls are ~90x slower than fp32 on the development CPU).
* ``timed(benchmark, fn, setup=None, rounds=None, warmup_rounds=None)``: times ``fn`` on the bench device
  (pedantic rounds on CPU; CUDA events via ``triton.testing.do_bench`` on CUDA) and returns one result.
* ``peak_memory(fn) -> int``: peak tensor bytes one call allocates beyond what was live before it
  (``torch.cuda.max_memory_allocated`` on CUDA; the profiler's allocation trace on CPU).
* ``floors``: the device's measured matmul rate (fp32 on CPU, bf16 on CUDA) and copy bandwidth, measured
  once per session, with ``floors.seconds(flops=..., bytes_moved=...)`` = the physical floor of a piece of
  work. Give a case its floor as ``benchmark.extra_info["floor_s"]``, or add a separate case whose provider
  name contains ``floor``; the report shows ``floor / our time``.

Every case tags ``benchmark.extra_info`` with ``op``, ``provider``, ``mode``, ``shape``, ``dtype``,
``device`` and, where measured, ``peak_mem_bytes``, ``launches``, ``tokens_per_step``, ``floor_s``
(the ``tag`` fixture does it). Providers named ``ours``, ``antibody_fast``, ``cpp`` or ``triton``
(or ``extra_info["ours"] = True``) are antibody_fast; the report divides every other provider's time in the
same ``(op, mode, shape, dtype)`` group by ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from antibody_fast.bench.measure import (
    bench_device as _env_device,
)
from antibody_fast.bench.measure import (
    measure_copy_gbps,
    measure_matmul_tflops,
    measure_peak_memory,
    quick_mode,
    tag_benchmark,
    time_benchmark,
)

_SKIPPED: list[str] = []
_FAILED: list[str] = []
_FLOORS: dict = {}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device (runs only with ANTIBODY_FAST_BENCH_DEVICE=cuda)"
    )
    config.addinivalue_line("markers", "slow: long-running")
    config.addinivalue_line("markers", "cpu_only: runs only with ANTIBODY_FAST_BENCH_DEVICE=cpu")


def pytest_collection_modifyitems(config, items):
    device = _env_device()
    no_cuda = device == "cuda" and not torch.cuda.is_available()
    for item in items:
        if no_cuda:
            item.add_marker(
                pytest.mark.skip(reason="ANTIBODY_FAST_BENCH_DEVICE=cuda but CUDA is not available")
            )
        elif item.get_closest_marker("gpu") and device != "cuda":
            item.add_marker(pytest.mark.skip(reason="GPU case (run with --device cuda)"))
        elif item.get_closest_marker("cpu_only") and device != "cpu":
            item.add_marker(pytest.mark.skip(reason="CPU-only case"))


def _first_line(longrepr) -> str:
    text = str(longrepr).strip().splitlines()
    errors = [line for line in text if line.startswith("E ")]
    return (errors[-1][1:].strip() if errors else (text[-1] if text else ""))[:300]


def pytest_collectreport(report):
    if report.failed:
        _FAILED.append(f"{report.nodeid}: collection error: {_first_line(report.longrepr)}")


def pytest_runtest_logreport(report):
    if report.failed:
        _FAILED.append(f"{report.nodeid} ({report.when}): {_first_line(report.longrepr)}")
    # Keep the reasons of skipped cases (e.g. an optional provider that is not installed) for the report.
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if "run with --device cuda" not in reason and "CPU-only case" not in reason:
            _SKIPPED.append(f"{report.nodeid}: {reason}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # A case interrupted mid-measurement (the runner's --time-limit sends SIGINT) has no rounds; drop it
    # before pytest-benchmark's own sessionfinish wrapper writes the JSON of every case that finished.
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None and isinstance(getattr(bs, "benchmarks", None), list):
        bs.benchmarks[:] = [b for b in bs.benchmarks if getattr(getattr(b, "stats", None), "data", None)]
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Picked up by antibody_fast.bench and moved into the result header.
    output_json["antibody_fast_floors"] = dict(_FLOORS)
    output_json["antibody_fast_skipped"] = list(_SKIPPED)
    output_json["antibody_fast_failed"] = list(_FAILED)


@pytest.fixture(scope="session")
def bench_device() -> str:
    return _env_device()


@pytest.fixture(scope="session")
def quick() -> bool:
    return quick_mode()


@pytest.fixture(scope="session")
def bench_dtype(bench_device) -> torch.dtype:
    return torch.bfloat16 if bench_device == "cuda" else torch.float32


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def timed(bench_device, quick):
    """``timed(benchmark, fn, setup=None, rounds=None, warmup_rounds=None)`` -> one result of ``fn``."""

    def run(benchmark, fn, *, setup=None, rounds=None, warmup_rounds=None):
        return time_benchmark(
            benchmark,
            fn,
            device=bench_device,
            setup=setup,
            rounds=rounds,
            warmup_rounds=warmup_rounds,
            quick=quick,
        )

    return run


@pytest.fixture
def peak_memory(bench_device):
    """``peak_memory(fn) -> int``: see antibody_fast.bench.measure_peak_memory."""

    def run(fn) -> int:
        return measure_peak_memory(fn, bench_device)

    return run


@dataclass(frozen=True)
class Floors:
    """Measured rates of the bench device: ``matmul_tflops`` (in ``dtype``) and ``copy_gbps`` (bytes read +
    written per second / 1e9)."""

    device: str
    dtype: torch.dtype
    matmul_tflops: float
    copy_gbps: float

    def seconds(self, *, flops: float = 0.0, bytes_moved: float = 0.0) -> float:
        """max(flops / matmul rate, bytes_moved / copy bandwidth), in seconds."""
        if flops < 0 or bytes_moved < 0:
            raise ValueError("flops and bytes_moved must be >= 0")
        return max(flops / (self.matmul_tflops * 1e12), bytes_moved / (self.copy_gbps * 1e9))


@pytest.fixture(scope="session")
def floors(bench_device, bench_dtype, quick) -> Floors:
    tflops = measure_matmul_tflops(bench_device, bench_dtype, quick=quick)
    gbps = measure_copy_gbps(bench_device, quick=quick)
    _FLOORS.update({f"matmul_tflops_{str(bench_dtype).removeprefix('torch.')}": tflops, "copy_gbps": gbps})
    return Floors(bench_device, bench_dtype, tflops, gbps)


@pytest.fixture
def tag(bench_device):
    """``tag(benchmark, op=..., provider=..., mode=..., shape=..., dtype=..., **extra)``: sets the
    ``extra_info`` keys the runner reads (see antibody_fast.bench.tag_benchmark)."""

    def run(benchmark, **kw) -> None:
        kw.setdefault("device", bench_device)
        tag_benchmark(benchmark, **kw)

    return run
