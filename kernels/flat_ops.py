"""Triton kernels of the flat-buffer ops (launchers: ``antibody_fast/ops/flat_ops/_triton.py``).

Reductions run in two launches: a persistent grid of ``P`` programs, each striding over blocks of its flat
tensor and accumulating in an fp32 (fp64 for fp64 input) vector, writes one fp64 partial per program; one
program then sums the partials of every group in order (deterministic). The elementwise kernels of
perturb/clip either sum those few partials themselves, in the same order (``FROM_PARTS``: every program gets
the same value, and the op needs no finalize launch), or read an already reduced (e.g. all-reduced) scalar;
they compute their scale on the device (IEEE ``sqrt_rn``/``div_rn``), so no host sync is needed. Their grids
are persistent too (a few programs per SM), so the partials are re-read only a few hundred times.

All loads of fp16/bf16 are upcast to fp32 right after loading (the interpreter computes bf16 arithmetic
wrongly); fp64 stays fp64.
"""

import triton
import triton.language as tl


@triton.jit
def _upcast(x, IS_FP64: tl.constexpr):
    if IS_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _ieee_sqrt(x, SQ_FP64: tl.constexpr):
    # fp32: the default sqrt/div are approximate on GPU, use the correctly rounded ones; fp64 is IEEE already
    if SQ_FP64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _ieee_div(x, y, SQ_FP64: tl.constexpr):
    if SQ_FP64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _sq_norm_partial_kernel(
    X_ptr,
    PART_ptr,
    n,
    part_offset,
    BLOCK: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    if IS_FP64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + cols
        x = _upcast(tl.load(X_ptr + offs, mask=offs < n, other=0.0), IS_FP64)
        acc += x * x
    tl.store(PART_ptr + part_offset + pid, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _grad_dots_partial_kernel(
    A_ptr,
    H_ptr,
    P_ptr,
    PART_ptr,
    n,
    part_offset,
    stride_part,
    BLOCK: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    if IS_FP64:
        acc_d = tl.zeros([BLOCK], dtype=tl.float64)
        acc_a = tl.zeros([BLOCK], dtype=tl.float64)
        acc_s = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc_d = tl.zeros([BLOCK], dtype=tl.float32)
        acc_a = tl.zeros([BLOCK], dtype=tl.float32)
        acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + cols
        mask = offs < n
        a = _upcast(tl.load(A_ptr + offs, mask=mask, other=0.0), IS_FP64)
        h = _upcast(tl.load(H_ptr + offs, mask=mask, other=0.0), IS_FP64)
        p = _upcast(tl.load(P_ptr + offs, mask=mask, other=0.0), IS_FP64)
        s = h - p
        acc_d += a * s
        acc_a += a * a
        acc_s += s * s
    base = PART_ptr + part_offset + pid
    tl.store(base, tl.sum(acc_d, axis=0).to(tl.float64))
    tl.store(base + stride_part, tl.sum(acc_a, axis=0).to(tl.float64))
    tl.store(base + 2 * stride_part, tl.sum(acc_s, axis=0).to(tl.float64))


@triton.jit
def _sum_partials_kernel(
    PART_ptr,
    OUT_ptr,
    n_parts,
    stride_part,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_P)
    for k in tl.static_range(K):
        acc = tl.zeros([BLOCK_P], dtype=tl.float64)
        for start in range(0, n_parts, BLOCK_P):
            offs = start + cols
            acc += tl.load(PART_ptr + k * stride_part + offs, mask=offs < n_parts, other=0.0)
        tl.store(OUT_ptr + k, tl.sum(acc, axis=0).to(OUT_ptr.dtype.element_ty))


@triton.jit
def _load_sq(
    SQ_ptr, PART_ptr, n_parts, FROM_PARTS: tl.constexpr, SQ_FP64: tl.constexpr, BLOCK_P: tl.constexpr
):
    """The squared norm: read from SQ_ptr, or (FROM_PARTS) summed from the fp64 partials of
    _sq_norm_partial_kernel, in the same order as _sum_partials_kernel (every program gets the same value)."""
    if FROM_PARTS:
        cols = tl.arange(0, BLOCK_P)
        acc = tl.zeros([BLOCK_P], dtype=tl.float64)
        for start in range(0, n_parts, BLOCK_P):
            offs = start + cols
            acc += tl.load(PART_ptr + offs, mask=offs < n_parts, other=0.0)
        sq = tl.sum(acc, axis=0)
        if not SQ_FP64:
            sq = sq.to(tl.float32)
    else:
        sq = tl.load(SQ_ptr)
    return sq


@triton.jit
def _perturb_kernel(
    T_ptr,
    B_ptr,
    G_ptr,
    SQ_ptr,
    PART_ptr,
    n_parts,
    SQ_OUT_ptr,
    FLAG_ptr,
    n,
    rho,
    eps,
    BLOCK: tl.constexpr,
    IS_FP64: tl.constexpr,
    WRITE_FLAG: tl.constexpr,
    SQ_FP64: tl.constexpr,
    FROM_PARTS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # persistent grid: each program strides over blocks (few programs, so the partials are read few times)
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    sq = _load_sq(SQ_ptr, PART_ptr, n_parts, FROM_PARTS, SQ_FP64, BLOCK_P)  # fp32, or fp64 (fp64 buffers)
    finite = sq < float("inf")  # sq >= 0: False exactly for inf and nan
    ok = finite & (sq > 0.0)
    norm = _ieee_sqrt(sq, SQ_FP64)
    scale = _upcast(tl.where(ok, _ieee_div(tl.zeros_like(sq) + rho, norm + eps, SQ_FP64), 0.0), IS_FP64)
    if WRITE_FLAG:
        tl.store(FLAG_ptr, tl.where(finite, 0, 1).to(tl.int8), mask=pid == 0)
        tl.store(SQ_OUT_ptr, sq.to(SQ_OUT_ptr.dtype.element_ty), mask=pid == 0)
    lim = tl.where(ok, n, 0)  # zero or non-finite norm: theta untouched, g not even read
    cols = tl.arange(0, BLOCK).to(tl.int64)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + cols
        mask = offs < n
        t_raw = tl.load(T_ptr + offs, mask=mask)
        tl.store(B_ptr + offs, t_raw, mask=mask)
        upd = offs < lim  # mask & ok (the interpreter rejects bool block & bool scalar)
        g = _upcast(tl.load(G_ptr + offs, mask=upd, other=0.0), IS_FP64)
        new = _upcast(t_raw, IS_FP64) - scale * g
        tl.store(T_ptr + offs, new.to(T_ptr.dtype.element_ty), mask=upd)


@triton.jit
def _restore_kernel(DST_ptr, SRC_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    tl.store(DST_ptr + offs, tl.load(SRC_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _antibody_combine_kernel(
    O_ptr,
    A_ptr,
    H_ptr,
    P_ptr,
    R_ptr,
    LT_ptr,
    LR_ptr,
    lt_value,
    lr_value,
    n,
    BLOCK: tl.constexpr,
    HAS_R: tl.constexpr,
    LT_TENSOR: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    if LT_TENSOR:
        lt = _upcast(tl.load(LT_ptr), IS_FP64)
    else:
        lt = lt_value  # fp32 scalar argument (fp64 lambdas always arrive as tensors)
    a = _upcast(tl.load(A_ptr + offs, mask=mask, other=0.0), IS_FP64)
    h = _upcast(tl.load(H_ptr + offs, mask=mask, other=0.0), IS_FP64)
    p = _upcast(tl.load(P_ptr + offs, mask=mask, other=0.0), IS_FP64)
    res = a + lt * (h - p)
    if HAS_R:
        if LR_TENSOR:
            lr = _upcast(tl.load(LR_ptr), IS_FP64)
        else:
            lr = lr_value  # fp32 scalar argument (fp64 lambdas always arrive as tensors)
        r = _upcast(tl.load(R_ptr + offs, mask=mask, other=0.0), IS_FP64)
        res = res + lr * r
    tl.store(O_ptr + offs, res.to(O_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _clip_kernel(
    G_ptr,
    SQ_ptr,
    PART_ptr,
    n_parts,
    NORM_ptr,
    n,
    max_norm,
    BLOCK: tl.constexpr,
    IS_FP64: tl.constexpr,
    WRITE_NORM: tl.constexpr,
    SQ_FP64: tl.constexpr,
    FROM_PARTS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    sq = _load_sq(SQ_ptr, PART_ptr, n_parts, FROM_PARTS, SQ_FP64, BLOCK_P)
    norm = _ieee_sqrt(sq, SQ_FP64)
    coef = _ieee_div(tl.zeros_like(sq) + max_norm, norm + 1e-6, SQ_FP64)
    coef = tl.where(coef > 1.0, 1.0, coef)  # NaN stays NaN (torch's clamp(max=1))
    if WRITE_NORM:
        tl.store(NORM_ptr, norm.to(NORM_ptr.dtype.element_ty), mask=pid == 0)
    # coef == 1 is the identity: skip the pass (no memory traffic at all when nothing is clipped)
    lim = tl.where(coef != 1.0, n, 0)
    c = _upcast(coef, IS_FP64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    for start in range(pid * BLOCK, lim, nprog * BLOCK):
        offs = start + cols
        mask = offs < lim
        x = _upcast(tl.load(G_ptr + offs, mask=mask, other=0.0), IS_FP64)
        tl.store(G_ptr + offs, (x * c).to(G_ptr.dtype.element_ty), mask=mask)


__all__ = [
    "triton",
    "_sq_norm_partial_kernel",
    "_grad_dots_partial_kernel",
    "_sum_partials_kernel",
    "_load_sq",
    "_perturb_kernel",
    "_restore_kernel",
    "_antibody_combine_kernel",
    "_clip_kernel",
]
