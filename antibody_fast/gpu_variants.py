"""What ``antibody_fast.gpu_compile`` compiles: every specialization the Triton launchers can produce on CUDA.

Each :class:`Variant` is one kernel with one set of constexprs (block sizes, flags), warps and stages and the
argument types of one input dtype, read from the launch configuration each op package re-exports
(``antibody_fast/ops/<op>/_triton.py``). Integer arguments carry representative values at the benchmark shapes
(H = 4096, V = 32000), specialised the way Triton's runtime specialises them (see ``gpu_compile``).
The order of :func:`variants` matters: the covering subset takes the first-listed variant on ties.
"""

from __future__ import annotations

import dataclasses
import importlib

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
                    PL_ptr="*fp32", PT_ptr="*fp32", ZT_ptr="*fp32", K=H, V=V, v_chunk=chunk, stride_hm=H, stride_hk=1,
                    stride_wv=H, stride_wk=1, stride_p=N, softcap="fp32",
                )  # fmt: skip
                dz_args = dict(
                    H_ptr=p, W_ptr=p, B_ptr=p, T_ptr="*i64", SID_ptr="*i64", PERM_ptr="*i64", NROWS_ptr="*i32",
                    LSE_ptr="*fp32", G_ptr="*fp32", DZ_ptr=dz_p, K=H, v_lo=0, v_hi=V, stride_hm=H,
                    stride_hk=1, stride_wv=H, stride_wk=1, stride_dz=dz_w, softcap="fp32",
                )  # fmt: skip
                for i, cfg in enumerate(cfgs["fwd"]):
                    add(
                        "_linear_fwd_kernel",
                        lab,
                        fwd_args,
                        {**flags, "STATS": False},
                        cfg,
                        tc,
                        i == 0 and bias and cap,
                    )
                    if i == 0 and not bias:  # per-token statistics (TRL's fused-head slot): first config only
                        add(
                            "_linear_fwd_kernel",
                            lab + " stats",
                            fwd_args,
                            {**flags, "STATS": True},
                            cfg,
                            tc,
                            False,
                        )
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
        PM_ptr="*fp32", PL_ptr="*fp32", PT_ptr="*fp32", ZT_ptr="*fp32", T_ptr="*i64", SID_ptr="*i64",
        PERM_ptr="*i64", NROWS_ptr="*i32", LSE_ptr="*fp32", LP_ptr="*fp32", ENT_ptr="*fp32", TOP_ptr="*i8",
        n_chunks=18, stride_p=N, V=V,
    )  # fmt: skip
    for stats in (False, True):
        out.append(
            _variant(
                m,
                "_lse_combine_kernel",
                f"BR{BR} BC{BC} w{warps}" + (" stats" if stats else ""),
                comb_args,
                dict(STATS=stats, BLOCK_R=BR, BLOCK_C=BC),
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
    m, cx, V = "sequence_logprob", dict(BLOCK_V=BV), 32000
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p = _tt(dtype)
        lab = f"{p[1:]} BV{BV} w{warps}"
        args = dict(
            L_ptr=p, T_ptr="*i64", SID_ptr="*i64", LSE_ptr="*fp32", LP_ptr="*fp32", V=V, stride_lm=V,
            stride_lv=1, ignore_index=-100,
        )  # fmt: skip
        out.append(_variant(m, "_fwd_kernel", lab, args, cx, warps, 3, "logits"))
        args = dict(
            G_ptr="*fp32", L_ptr=p, T_ptr="*i64", SID_ptr="*i64", LSE_ptr="*fp32", OUT_ptr=p, V=V,
            stride_lm=V, stride_lv=1, stride_om=V, ignore_index=-100,
        )  # fmt: skip
        out.append(_variant(m, "_bwd_kernel", lab, args, cx, warps, 3, "logits"))
    return out


def _flat_variants() -> list[Variant]:
    import torch

    fo = importlib.import_module("antibody_fast.ops.flat_ops")

    m = "flat_ops"
    n = 1 << 24  # a flat buffer's numel (divisible by 16)
    W, BR, BE, BP = fo.NUM_WARPS, fo.BLOCK_RED, fo.BLOCK_EW, fo.BLOCK_P
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    out = []

    def add(kernel, label, args, constexprs, warps=W):
        out.append(_variant(m, kernel, label, args, constexprs, warps, 3, "flat"))

    for dt in dtypes:
        p, f64 = _tt(dt), dt == torch.float64
        red = dict(BLOCK=BR, IS_FP64=f64)
        add("_sq_norm_partial_kernel", p[1:], dict(X_ptr=p, PART_ptr="*fp64", n=n, part_offset=16), red)
        dots = dict(A_ptr=p, H_ptr=p, P_ptr=p, PART_ptr="*fp64", n=n, part_offset=16, stride_part=528)
        add("_grad_dots_partial_kernel", p[1:], dots, red)
        # the squared norm: fp64 for fp64 buffers, else fp32 (given by the caller or summed from the partials)
        sq = "*fp64" if f64 else "*fp32"
        for write in (False, True):
            for from_parts in (False, True):
                lab = f"{p[1:]} write={int(write)} from_parts={int(from_parts)}"
                sq_in = "*fp64" if from_parts else sq
                args = dict(
                    T_ptr=p, B_ptr=p, G_ptr=p, SQ_ptr=sq_in, PART_ptr=sq_in, n_parts=528, SQ_OUT_ptr=sq,
                    FLAG_ptr="*i8", n=n, rho="fp32", eps="fp32",
                )  # fmt: skip
                cx = dict(
                    BLOCK=BE, IS_FP64=f64, WRITE_FLAG=write, SQ_FP64=f64, FROM_PARTS=from_parts, BLOCK_P=BP
                )
                add("_perturb_kernel", lab, args, cx)
                args = dict(
                    G_ptr=p, SQ_ptr=sq_in, PART_ptr=sq_in, n_parts=528, NORM_ptr="*fp32", n=n, max_norm="fp32"
                )  # fmt: skip
                cx = dict(
                    BLOCK=BE, IS_FP64=f64, WRITE_NORM=write, SQ_FP64=f64, FROM_PARTS=from_parts, BLOCK_P=BP
                )
                add("_clip_kernel", lab, args, cx)
        for has_r in (False, True):
            for lt_t in (False, True):
                for lr_t in (False, True):
                    if f64 and not (lt_t and lr_t):
                        continue  # fp64 lambdas always arrive as tensors
                    lam = "*fp64" if f64 else "*fp32"
                    args = dict(
                        O_ptr=p, A_ptr=p, H_ptr=p, P_ptr=p, R_ptr=p, LT_ptr=lam, LR_ptr=lam, lt_value="fp32",
                        lr_value="fp32", n=n,
                    )  # fmt: skip
                    cx = dict(BLOCK=BE, HAS_R=has_r, LT_TENSOR=lt_t, LR_TENSOR=lr_t, IS_FP64=f64)
                    add(
                        "_antibody_combine_kernel",
                        f"{p[1:]} r={int(has_r)} lt_t={int(lt_t)} lr_t={int(lr_t)}",
                        args,
                        cx,
                    )
    for bits in ("*i16", "*i32", "*i64"):  # the bitwise copy of 2-, 4- and 8-byte floats
        add("_restore_kernel", bits[1:], dict(DST_ptr=bits, SRC_ptr=bits, n=n), dict(BLOCK=BE))
    for K, dt in ((1, "*fp32"), (1, "*fp64"), (3, "*fp32")):  # sq (fp32 / fp64 result), dots (fp32)
        args = dict(PART_ptr="*fp64", OUT_ptr=dt, n_parts=528, stride_part=528)
        add("_sum_partials_kernel", f"K={K} {dt[1:]}", args, dict(K=K, BLOCK_P=BP), warps=4)
    return out


def variants() -> list[Variant]:
    """Every specialization the launchers can produce on CUDA (see the module docstring)."""
    return _lm_head_variants() + _logits_variants() + _flat_variants()
