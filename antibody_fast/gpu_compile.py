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

What gets compiled (:func:`variants`) is derived from the launchers (``antibody_fast/ops/<op>/_triton.py``,
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
import dataclasses
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

ARCHS = (80, 90)
# Shared memory one block may use (bytes): sm_80 (A100) 163 KiB, sm_90 (H100/H200) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_TORCH_TO_TRITON = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
}


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
# variants
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One specialization of one kernel: what a launcher can pass.

    ``args``: every non-constexpr argument -> a pointer type (``"*bf16"``), ``"fp32"`` (a float scalar) or a
    representative int (specialised like the runtime does: 1 -> constant, divisible by 16 -> hint).
    ``matmul_tc``: an fp16/bf16 ``tl.dot`` kernel that must use tensor cores. ``ci``: architectures at which
    the CI test compiles this variant even outside the covering subset (:func:`todo_for`; the report
    compiles every variant at every architecture)."""

    module: str
    kernel: str
    label: str
    args: tuple[tuple[str, object], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    group: str
    matmul_tc: bool = False
    ci: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.label}]"


def _tt(dtype) -> str:
    return "*" + _TORCH_TO_TRITON[str(dtype).replace("torch.", "")]


def _variant(module, kernel, label, args, constexprs, warps, stages, group, **kw) -> Variant:
    return Variant(
        module=module,
        kernel=kernel,
        label=label,
        args=tuple(args.items()),
        constexprs=tuple(constexprs.items()),
        num_warps=int(warps),
        num_stages=int(stages),
        group=group,
        **kw,
    )


def _lm_head_variants() -> list[Variant]:
    """The fused lm_head kernels: every autotune configuration of ``LINEAR_CONFIGS`` (CUDA kinds) x dtype x
    bias / softcap / gradient flags, at the benchmark shapes (H = 4096, V = 32000, N = 4096)."""
    import torch

    slp = importlib.import_module("antibody_fast.ops.sequence_logprob")
    cuda = torch.device("cuda")
    H, V, N = 4096, 32000, 4096  # V = 128256 specialises the same way (divisible by 16)
    chunk, dz_w = 1792, 32768  # forward chunk / dz buffer width at these shapes (any multiple of 256)
    m = "sequence_logprob"
    out = []

    def add(kernel, label, args, cx, cfg, tc, heavy):
        bm, bv, bk, w, st = cfg
        blocks = dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk)
        tag = f"{label} {bm}x{bv}x{bk} w{w} s{st}"
        out.append(_variant(m, kernel, tag, args, {**cx, **blocks}, w, st, "lm_head", matmul_tc=tc))
        if heavy:  # the heaviest flags of the first config once more with a vocabulary not divisible by 16
            odd = {k: (V + 1 if k in ("V", "v_hi") else a) for k, a in args.items()}
            out.append(
                _variant(m, kernel, tag + " oddV", odd, {**cx, **blocks}, w, st, "lm_head", matmul_tc=tc)
            )

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        kind = slp.config_kind(dtype, cuda)
        p = _tt(dtype)
        dz_p = p if kind == "tc" else "*fp32"
        tc = kind == "tc"
        dot = dict(DOT_F32=not tc)
        cfgs = {stage: slp.LINEAR_CONFIGS[stage][kind] for stage in slp.LINEAR_CONFIGS}
        for bias in (False, True):
            for cap in (False, True):
                flags = dict(HAS_BIAS=bias, HAS_SOFTCAP=cap, **dot)
                lab = f"{p[1:]} bias={int(bias)} cap={int(cap)}"
                fwd_args = dict(
                    H_ptr=p, W_ptr=p, B_ptr=p, T_ptr="*i64", PERM_ptr="*i64", NROWS_ptr="*i32", PM_ptr="*fp32",
                    PL_ptr="*fp32", ZT_ptr="*fp32", K=H, V=V, v_chunk=chunk, stride_hm=H, stride_hk=1,
                    stride_wv=H, stride_wk=1, stride_p=N, softcap="fp32",
                )  # fmt: skip
                dz_args = dict(
                    H_ptr=p, W_ptr=p, B_ptr=p, T_ptr="*i64", SID_ptr="*i64", PERM_ptr="*i64", NROWS_ptr="*i32",
                    LSE_ptr="*fp32", G_ptr="*fp32", DZ_ptr=dz_p, K=H, v_lo=0, v_hi=V, stride_hm=H,
                    stride_hk=1, stride_wv=H, stride_wk=1, stride_dz=dz_w, softcap="fp32",
                )  # fmt: skip
                for i, cfg in enumerate(cfgs["fwd"]):
                    add("_linear_fwd_kernel", lab, fwd_args, flags, cfg, tc, i == 0 and bias and cap)
                for i, cfg in enumerate(cfgs["dz"]):
                    add("_linear_dz_kernel", lab, dz_args, flags, cfg, tc, i == 0 and bias and cap)
        dh_args = dict(
            DZ_ptr=dz_p, W_ptr=p, PERM_ptr="*i64", NROWS_ptr="*i32", DH_ptr="*fp32", K=H, v_lo=0, v_hi=V,
            stride_dz=dz_w, stride_wv=H, stride_wk=1, stride_dhm=H,
        )  # fmt: skip
        for i, cfg in enumerate(cfgs["dh"]):
            add("_linear_dh_kernel", p[1:], dh_args, dot, cfg, tc, i == 0)
        for mode, ndw, ndb in (("dw", True, False), ("dw+db", True, True), ("db", False, True)):
            dw_args = dict(
                DZ_ptr=dz_p, H_ptr=p, PERM_ptr="*i64", NROWS_ptr="*i32", DW_ptr=p if ndw else dz_p,
                DB_ptr="*fp32", K=H, v_lo=0, v_hi=V, stride_dz=dz_w, stride_hm=H, stride_hk=1,
                stride_dwv=H if ndw else 0,
            )  # fmt: skip
            cx = dict(NEED_DW=ndw, NEED_DB=ndb, **dot)
            for i, cfg in enumerate(cfgs["dw"]):
                add(
                    "_linear_dw_kernel",
                    f"{p[1:]} {mode}",
                    dw_args,
                    cx,
                    cfg,
                    tc and ndw,
                    i == 0 and ndw and ndb,
                )
    BR, BC, warps = slp.COMBINE_BLOCKS["cuda"]
    comb_args = dict(
        PM_ptr="*fp32", PL_ptr="*fp32", ZT_ptr="*fp32", T_ptr="*i64", SID_ptr="*i64", PERM_ptr="*i64",
        NROWS_ptr="*i32", LSE_ptr="*fp32", LP_ptr="*fp32", n_chunks=18, stride_p=N, V=V,
    )  # fmt: skip
    out.append(
        _variant(
            m,
            "_lse_combine_kernel",
            f"BR{BR} BC{BC} w{warps}",
            comb_args,
            dict(BLOCK_R=BR, BLOCK_C=BC),
            warps,
            3,
            "lm_head",
        )  # fmt: skip
    )
    return out


def _logits_variants() -> list[Variant]:
    import torch

    slp = importlib.import_module("antibody_fast.ops.sequence_logprob")

    BV, warps = slp.logits_block(torch.device("cuda"))
    out = []
    V = 32000
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p = _tt(dtype)
        args = dict(
            L_ptr=p, T_ptr="*i64", SID_ptr="*i64", LSE_ptr="*fp32", LP_ptr="*fp32", V=V, stride_lm=V,
            stride_lv=1, ignore_index=-100,
        )  # fmt: skip
        out.append(
            _variant(
                "sequence_logprob",
                "_fwd_kernel",
                f"{p[1:]} BV{BV} w{warps}",
                args,
                dict(BLOCK_V=BV),
                warps,
                3,
                "logits",
            )  # fmt: skip
        )
        args = dict(
            G_ptr="*fp32", L_ptr=p, T_ptr="*i64", SID_ptr="*i64", LSE_ptr="*fp32", OUT_ptr=p, V=V,
            stride_lm=V, stride_lv=1, stride_om=V, ignore_index=-100,
        )  # fmt: skip
        out.append(
            _variant(
                "sequence_logprob",
                "_bwd_kernel",
                f"{p[1:]} BV{BV} w{warps}",
                args,
                dict(BLOCK_V=BV),
                warps,
                3,
                "logits",
            )  # fmt: skip
        )
    return out


def _flat_variants() -> list[Variant]:
    import torch

    fo = importlib.import_module("antibody_fast.ops.flat_ops")

    m = "flat_ops"
    n = 1 << 24  # a flat buffer's numel (divisible by 16)
    W, BR, BE, BP = fo.NUM_WARPS, fo.BLOCK_RED, fo.BLOCK_EW, fo.BLOCK_P
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    out = []
    for dt in dtypes:
        p, f64 = _tt(dt), dt == torch.float64
        out.append(
            _variant(
                m,
                "_sq_norm_partial_kernel",
                p[1:],
                dict(X_ptr=p, PART_ptr="*fp64", n=n, part_offset=16),
                dict(BLOCK=BR, IS_FP64=f64),
                W,
                3,
                "flat",
            )  # fmt: skip
        )
        out.append(
            _variant(
                m,
                "_grad_dots_partial_kernel",
                p[1:],
                dict(A_ptr=p, H_ptr=p, P_ptr=p, PART_ptr="*fp64", n=n, part_offset=16, stride_part=528),
                dict(BLOCK=BR, IS_FP64=f64),
                W,
                3,
                "flat",
            )  # fmt: skip
        )
        # the squared norm: fp64 for fp64 buffers, else fp32 (given by the caller or summed from the partials)
        sq = "*fp64" if f64 else "*fp32"
        for write in (False, True):
            for from_parts in (False, True):
                lab = f"{p[1:]} write={int(write)} from_parts={int(from_parts)}"
                sq_in = "*fp64" if from_parts else sq
                out.append(
                    _variant(
                        m,
                        "_perturb_kernel",
                        lab,
                        dict(
                            T_ptr=p,
                            B_ptr=p,
                            G_ptr=p,
                            SQ_ptr=sq_in,
                            PART_ptr=sq_in,
                            n_parts=528,
                            SQ_OUT_ptr=sq,
                            FLAG_ptr="*i8",
                            n=n,
                            rho="fp32",
                            eps="fp32",
                        ),
                        dict(
                            BLOCK=BE,
                            IS_FP64=f64,
                            WRITE_FLAG=write,
                            SQ_FP64=f64,
                            FROM_PARTS=from_parts,
                            BLOCK_P=BP,
                        ),
                        W,
                        3,
                        "flat",
                    )  # fmt: skip
                )
                out.append(
                    _variant(
                        m,
                        "_clip_kernel",
                        lab,
                        dict(
                            G_ptr=p,
                            SQ_ptr=sq_in,
                            PART_ptr=sq_in,
                            n_parts=528,
                            NORM_ptr="*fp32",
                            n=n,
                            max_norm="fp32",
                        ),
                        dict(
                            BLOCK=BE,
                            IS_FP64=f64,
                            WRITE_NORM=write,
                            SQ_FP64=f64,
                            FROM_PARTS=from_parts,
                            BLOCK_P=BP,
                        ),
                        W,
                        3,
                        "flat",
                    )  # fmt: skip
                )
        for has_r in (False, True):
            for lt_t in (False, True):
                for lr_t in (False, True):
                    if f64 and not (lt_t and lr_t):
                        continue  # fp64 lambdas always arrive as tensors
                    lam = "*fp64" if f64 else "*fp32"
                    out.append(
                        _variant(
                            m,
                            "_antibody_combine_kernel",
                            f"{p[1:]} r={int(has_r)} lt_t={int(lt_t)} lr_t={int(lr_t)}",
                            dict(
                                O_ptr=p,
                                A_ptr=p,
                                H_ptr=p,
                                P_ptr=p,
                                R_ptr=p,
                                LT_ptr=lam,
                                LR_ptr=lam,
                                lt_value="fp32",
                                lr_value="fp32",
                                n=n,
                            ),
                            dict(BLOCK=BE, HAS_R=has_r, LT_TENSOR=lt_t, LR_TENSOR=lr_t, IS_FP64=f64),
                            W,
                            3,
                            "flat",
                        )  # fmt: skip
                    )
    for bits in ("*i16", "*i32", "*i64"):  # the bitwise copy of 2-, 4- and 8-byte floats
        out.append(
            _variant(
                m,
                "_restore_kernel",
                bits[1:],
                dict(DST_ptr=bits, SRC_ptr=bits, n=n),
                dict(BLOCK=BE),
                W,
                3,
                "flat",
            )  # fmt: skip
        )
    for K, dt in ((1, "*fp32"), (1, "*fp64"), (3, "*fp32")):  # sq (fp32 / fp64 result), dots (fp32)
        out.append(
            _variant(
                m,
                "_sum_partials_kernel",
                f"K={K} {dt[1:]}",
                dict(PART_ptr="*fp64", OUT_ptr=dt, n_parts=528, stride_part=528),
                dict(K=K, BLOCK_P=BP),
                4,
                3,
                "flat",
            )  # fmt: skip
        )
    return out


def variants() -> list[Variant]:
    """Every specialization the launchers can produce on CUDA (see the module docstring)."""
    return _lm_head_variants() + _logits_variants() + _flat_variants()


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
