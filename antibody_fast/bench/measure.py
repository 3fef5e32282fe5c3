"""Measurement helpers of the benchmark suites, wrapped as fixtures by ``benchmarks/conftest.py``.

* the run's settings, from the environment variables the runner sets: :func:`quick_mode`, :func:`bench_device`;
* timing (:func:`time_benchmark`) and peak memory (:func:`measure_peak_memory`) of one case;
* the device's measured floors: :func:`measure_matmul_tflops`, :func:`measure_copy_gbps`, :func:`floor_seconds`;
* the ``extra_info`` tags the runner reads (:func:`tag_benchmark`; see :mod:`antibody_fast.bench`).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable

QUICK_ENV = "ANTIBODY_FAST_BENCH_QUICK"
DEVICE_ENV = "ANTIBODY_FAST_BENCH_DEVICE"


def quick_mode() -> bool:
    """True when ``ANTIBODY_FAST_BENCH_QUICK`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get(QUICK_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def bench_device() -> str:
    """The device the suites run on: ``ANTIBODY_FAST_BENCH_DEVICE`` (``cpu`` or ``cuda``), default ``cpu``."""
    dev = os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={dev!r}: expected 'cpu' or 'cuda'")
    return dev


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
