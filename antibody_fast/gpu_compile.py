"""GPU compile check without a GPU: every Triton kernel, every launcher specialization, sm_80 and sm_90.

Triton ships ``ptxas``, ``cuobjdump`` and ``nvdisasm`` in its wheel, so a kernel compiles to a cubin for any
NVIDIA architecture on a machine without a GPU:
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``.
Nothing is launched. For each compile this module records

* registers, stack frame, spill stores / loads (``ptxas -v``: Triton's own ptxas run, whose log it prints
  when ``knobs.nvidia.dump_ptxas_log`` is set; a second ``ptxas -v`` run on the PTX if that log is missing),
* shared memory (the compiled metadata: what a launch asks for),
* the tensor-core instructions in the SASS (``cuobjdump -sass``): ``HMMA`` (mma.sync, sm_80+) and
  ``HGMMA`` (wgmma, sm_90a),

and reports a violation for spills, shared memory over the architecture's limit, or an fp16/bf16 matmul
kernel without tensor-core instructions.

What gets compiled (:func:`antibody_fast.gpu_variants.variants`) is derived from the launchers (``antibody_fast/ops/<op>/_triton.py``,
whose launch configuration each op package re-exports): the same block / warp / stage configurations
(autotune configurations included) and constexpr flags, for every input dtype the op accepts on CUDA. Integer arguments are specialised the way Triton's runtime specialises a call
with contiguous, 16-byte aligned tensors (a unit stride becomes the constant 1, pointers and the sizes
divisible by 16 carry ``tt.divisibility=16``) at the benchmark shapes (H = 4096, V = 32000). The launchers keep
the pointers aligned (they copy a misaligned view) and pad the strides of their own buffers to multiples of
16, so the row count never changes the specialization; a vocabulary not divisible by 16 does (GPT-2's 50257),
and each matmul kernel is also compiled once that way (``oddV``). A hidden size not divisible by 16 (no
current LLM) would be yet another specialization, not compiled here.

Kernel modules are loaded from their files under a private module name with ``TRITON_INTERPRET`` unset (the
tests set it for the interpreter, and a kernel defined under it cannot be compiled), in worker processes
with a fresh Triton cache each, so that nothing is reused from an earlier run.

Command line: ``python -m antibody_fast.gpu_compile [--arch 80 90] [--only SUBSTR] [--jobs N] [--json F]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import importlib.util
import io
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .gpu_variants import Variant, variants

ARCHS = (80, 90)
# Shared memory one block may use (bytes): sm_80 (A100) 163 KiB, sm_90 (H100/H200) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def kernels_dir() -> Path:
    """The folder holding the ``@triton.jit`` kernel modules (``kernels/``, installed as
    ``antibody_fast.kernels``)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "kernels", here.parent / "kernels"):  # installed package, source tree (editable)
        if (cand / "__init__.py").is_file():
            return cand
    spec = importlib.util.find_spec("antibody_fast.kernels")  # pragma: no cover
    return Path(list(spec.submodule_search_locations)[0])  # pragma: no cover


def kernel_modules() -> list[str]:
    return sorted(p.stem for p in kernels_dir().glob("*.py") if p.stem != "__init__")


def jit_kernel_names(module: str) -> list[str]:
    """Names of the top-level ``@triton.jit`` functions of a kernel module that are launched (``*_kernel``),
    found by reading the source (no import)."""
    src = (kernels_dir() / f"{module}.py").read_text()
    return re.findall(r"^@triton\.jit\s*\ndef (\w+_kernel)\(", src, flags=re.MULTILINE)


def source_hash() -> str:
    """sha256 of the kernel sources (names the build a report describes)."""
    h = hashlib.sha256()
    for m in kernel_modules():
        h.update(m.encode())
        h.update((kernels_dir() / f"{m}.py").read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# compiling (worker side: imports triton only)
# ------------------------------------------------------------------------------------------------------------

_MODULES: dict = {}


def _load_module(module: str):
    """The kernel module loaded from its file as ``_antibody_fast_gpu.<module>`` with TRITON_INTERPRET unset
    (JIT functions, compilable for a GPU target)."""
    if module not in _MODULES:
        saved = os.environ.pop("TRITON_INTERPRET", None)
        try:
            spec = importlib.util.spec_from_file_location(
                f"_antibody_fast_gpu.{module}", kernels_dir() / f"{module}.py"
            )
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
        _MODULES[module] = mod
    return _MODULES[module]


def _signature(fn, v: Variant):
    """(signature, constexprs, attrs) for ASTSource, specialised like the runtime (see the module docstring)."""
    args = dict(v.args)
    cx = dict(v.constexprs)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            sig[name] = "constexpr"
            consts[name] = cx[name]
            continue
        if name not in args:
            raise KeyError(f"{v.name}: no value for argument {name!r}")
        a = args[name]
        if isinstance(a, str):
            sig[name] = a
            if a.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(f"{v.name}: argument {name!r}: expected a type string or an int, got {a!r}")
        elif a == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    extra = set(args) | set(cx)
    unknown = extra - set(fn.arg_names)
    if unknown:
        raise KeyError(f"{v.name}: arguments {sorted(unknown)} are not parameters of the kernel")
    return sig, consts, attrs


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_MMA_RE = re.compile(r"\b((?:HGMMA|HMMA|IMMA|DMMA|UTCHMMA|UTCMMA)(?:\.[\w]+)*)")


def _parse_ptxas(log: str) -> dict:
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.findall(log)
        out[key] = max(int(x) for x in m) if m else None
    return out


def _ptxas_rerun(ptx: str, arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        r = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    return r.stdout + r.stderr


def _sass_mma(cubin: bytes) -> dict[str, int]:
    """Tensor-core instructions in the SASS: {opcode with modifiers: count}."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.cubin")
        Path(f).write_bytes(cubin)
        sass = subprocess.run([tool, "-sass", f], capture_output=True, text=True, check=True).stdout
    counts: dict[str, int] = {}
    for line in sass.splitlines():
        m = _MMA_RE.search(line)
        if m and "/*" in line:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def compile_one(v: Variant, arch: int) -> dict:
    """Compile one variant for ``sm_<arch>`` and return its resource usage (see :func:`check`)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    res = {"kernel": v.kernel, "label": v.label, "group": v.group, "arch": arch, "matmul_tc": v.matmul_tc}
    try:
        fn = getattr(_load_module(v.module), v.kernel)
        sig, consts, attrs = _signature(fn, v)
        knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            c = triton.compile(
                ASTSource(fn, sig, consts, attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": v.num_warps, "num_stages": v.num_stages},
            )
        log = buf.getvalue()
        info = _parse_ptxas(log)
        if info["registers"] is None or info["spill_stores"] is None:
            info = _parse_ptxas(_ptxas_rerun(c.asm["ptx"], arch))
        res.update(info)
        res["shared"] = int(c.metadata.shared)
        res["mma"] = _sass_mma(c.asm["cubin"])
        res["ok"] = True
    except Exception as e:  # a failed compile is a result (reported as a violation), not a crash
        res.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[:2000]}")
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["violations"] = check(res)
    return res


def check(res: dict) -> list[str]:
    """Violations of one compile result: failure, spills, shared memory over the limit, no tensor cores."""
    if not res.get("ok"):
        return [f"compile failed: {res.get('error', '?')}"]
    out = []
    if res.get("registers") is None or res.get("spill_stores") is None:
        out.append("no ptxas -v statistics")
    if (res.get("spill_stores") or 0) > 0 or (res.get("spill_loads") or 0) > 0:
        out.append(f"spills: {res['spill_stores']} B stored, {res['spill_loads']} B loaded")
    limit = SMEM_LIMIT[res["arch"]]
    if res["shared"] > limit:
        out.append(f"shared memory {res['shared']} B > {limit} B (sm_{res['arch']})")
    if res["matmul_tc"]:
        ops = res.get("mma") or {}
        want = ("HMMA",) if res["arch"] < 90 else ("HGMMA", "HMMA")
        if not any(k.startswith(w) for k in ops for w in want):
            out.append(f"no tensor-core instruction ({' or '.join(want)}) in an fp16/bf16 matmul kernel")
    return out


def _init_worker(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's warning; 1 = its default


def default_jobs() -> int:
    env = os.environ.get("ANTIBODY_FAST_COMPILE_JOBS")
    if env:
        return max(1, int(env))
    return max(1, min(4, os.cpu_count() or 1))


def run(
    todo: list[tuple[Variant, int]],
    jobs: int | None = None,
    progress: bool = False,
    time_limit_s: float | None = None,
) -> list[dict | None]:
    """Compile every (variant, arch) in worker processes (fresh Triton cache each run); results in order.
    With ``time_limit_s``, compiles not finished by then are cancelled and their results are None."""
    jobs = jobs or default_jobs()
    t0 = time.monotonic()
    results: list[dict | None] = [None] * len(todo)
    with tempfile.TemporaryDirectory(prefix="antibody_fast_gpu_compile_") as cache:
        ctx = mp.get_context("spawn")
        ex = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(cache,))
        try:
            futs = {ex.submit(compile_one, v, a): i for i, (v, a) in enumerate(todo)}
            left = None if time_limit_s is None else max(0.0, time_limit_s - (time.monotonic() - t0))
            try:
                for n, f in enumerate(cf.as_completed(futs, timeout=left), 1):
                    i = futs[f]
                    r = results[i] = f.result()
                    if progress:
                        bad = "; ".join(r["violations"]) or "ok"
                        print(f"[{n}/{len(todo)}] sm_{r['arch']} {r['kernel']}[{r['label']}] {r['seconds']}s {bad}",
                              file=sys.stderr, flush=True)  # fmt: skip
            except cf.TimeoutError:
                print(
                    f"time limit {time_limit_s:.0f} s: {results.count(None)} compiles cancelled",
                    file=sys.stderr,
                )
                # abandon the compiles in flight too (ends the worker processes this pool started)
                for proc in list(getattr(ex, "_processes", {}).values()):
                    proc.terminate()
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
    return results


def covering_subset(vs: list[Variant]) -> list[Variant]:
    """Per kernel, a few variants in which every value of every axis (every word of the labels: dtype, flag,
    block config, grad mode, ``oddV``) occurs at least once (greedy set cover, first-listed on ties)."""
    out = []
    for kernel in dict.fromkeys(v.kernel for v in vs):
        lst = [v for v in vs if v.kernel == kernel]
        need = {w for v in lst for w in v.label.split()}
        while need:
            best = max(lst, key=lambda v: len(need & set(v.label.split())))
            out.append(best)
            need -= set(best.label.split())
    return out


def todo_for(vs: list[Variant], archs=ARCHS, ci_only: bool = False) -> list[tuple[Variant, int]]:
    """(variant, arch) pairs to compile: the CI set first (the covering subset at every architecture plus the
    variants whose ``ci`` names the architecture), then, unless ``ci_only``, every other pair."""
    cover = covering_subset(vs)
    first = [(v, a) for v in vs for a in archs if v in cover or a in v.ci]
    if ci_only:
        return first
    return first + [(v, a) for v in vs for a in archs if (v, a) not in first]


def triton_version() -> str:
    import triton

    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=list(SMEM_LIMIT))
    ap.add_argument("--only", default="", help="substring of group/kernel/label to select")
    ap.add_argument("--ci", action="store_true", help="only the CI subset")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    vs = [v for v in variants() if a.only in f"{v.group} {v.kernel} {v.label}"]
    results = [r for r in run(todo_for(vs, a.arch, a.ci), a.jobs, progress=True) if r is not None]
    bad = [r for r in results if r["violations"]]
    if a.json:
        Path(a.json).write_text(json.dumps({"triton": triton_version(), "results": results}, indent=1))
    print(f"{len(results)} compiles, {len(bad)} with violations (triton {triton_version()})")
    for r in bad:
        print(f"  sm_{r['arch']} {r['kernel']}[{r['label']}]: {'; '.join(r['violations'])}")
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
