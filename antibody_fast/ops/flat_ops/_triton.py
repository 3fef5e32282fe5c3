"""Triton launchers of the flat-buffer ops (the ``@triton.jit`` kernels: ``kernels/flat_ops.py``, imported lazily:
``TRITON_INTERPRET`` must be set before they are defined).

Each op takes the same arguments as its torch twin (``_torch.py``). Reductions: a persistent grid writes fp64
partial sums, then one program sums them in order (deterministic). The block sizes here are public because
``antibody_fast.gpu_compile`` compiles exactly what they can launch.
"""

from __future__ import annotations

import functools

import torch

from ._torch import ClipParams, CombineParams, PerturbParams, sq_dtype


def _kernels():
    from ...kernels import flat_ops as k  # lazy: TRITON_INTERPRET must be set before the kernels are defined

    return k


BLOCK_RED = 2048  # elements per program iteration of the reductions
BLOCK_EW = 2048  # elements per program of the elementwise kernels
NUM_WARPS = 8
BLOCK_P = 1024  # partials summed per iteration by the finalize / fused elementwise kernels


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _max_programs(device: torch.device, per_sm: int) -> int:
    """Size of the persistent grids: ``per_sm`` programs per SM on CUDA, 16 under the interpreter."""
    return per_sm * _sm_count(device) if device.type == "cuda" else 16


def _is_fp64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _ew_grid(n: int, device: torch.device) -> tuple[int]:
    return (max(1, min(_max_programs(device, 8), _cdiv(n, BLOCK_EW))),)


def _partials(kind: str, groups: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, int]:
    """One launch per group: fp64 partial sums ``[K, total]`` of a persistent grid (K=1 "sq", K=3 "dots")."""
    k = _kernels()
    dev = groups[0][0].device
    cap = _max_programs(dev, 4)
    nprogs = [max(1, min(cap, _cdiv(g[0].numel(), BLOCK_RED))) for g in groups]
    total = sum(nprogs)
    K = 1 if kind == "sq" else 3
    parts = torch.empty((K, total), dtype=torch.float64, device=dev)
    off = 0
    for g, P in zip(groups, nprogs):
        n = g[0].numel()
        if kind == "sq":
            k._sq_norm_partial_kernel[(P,)](
                g[0], parts, n, off, BLOCK=BLOCK_RED, IS_FP64=_is_fp64(g[0]), num_warps=NUM_WARPS
            )
        else:
            k._grad_dots_partial_kernel[(P,)](
                g[0],
                g[1],
                g[2],
                parts,
                n,
                off,
                total,
                BLOCK=BLOCK_RED,
                IS_FP64=_is_fp64(g[0]),
                num_warps=NUM_WARPS,
            )
        off += P
    return parts, total


def _finalize(parts: torch.Tensor, total: int, out_dtype: torch.dtype) -> torch.Tensor:
    """One launch: the ordered sum of the partials, ``[K]`` in ``out_dtype``."""
    K = parts.shape[0]
    out = torch.empty((K,), dtype=out_dtype, device=parts.device)
    _kernels()._sum_partials_kernel[(1,)](parts, out, total, total, K=K, BLOCK_P=BLOCK_P, num_warps=4)
    return out


def sq_norm(xs):
    """2 launches: per-program fp64 partials, then their ordered sum."""
    parts, total = _partials("sq", [(x,) for x in xs])
    return _finalize(parts, total, sq_dtype(xs)).reshape(())


def grad_dots(g_a, g_h, g_p):
    """2 launches: per-program fp64 partials of the three sums, then their ordered sums."""
    parts, total = _partials("dots", list(zip(g_a, g_h, g_p)))
    return _finalize(parts, total, torch.float32)


def _sq_source(g, sq):
    """(sq or dummy, partials or dummy, n_parts, sq dtype, from_parts): without a given squared norm the
    elementwise kernels sum the partials themselves (no finalize launch)."""
    if sq is not None:
        return sq, sq, 0, sq.dtype, False
    parts, total = _partials("sq", [(x,) for x in g])
    return parts, parts, total, sq_dtype(g), True


def _norm_pass_meta(x, sq_dtype, from_parts) -> dict:
    """The compile-time arguments of an elementwise pass that reads the squared norm (perturb_, clip_)."""
    return dict(
        BLOCK=BLOCK_EW,
        IS_FP64=_is_fp64(x),
        SQ_FP64=sq_dtype == torch.float64,
        FROM_PARTS=from_parts,
        BLOCK_P=BLOCK_P,
        num_warps=NUM_WARPS,
    )


def perturb_(theta, backup, g, sq, p: PerturbParams):
    """Without ``sq``: the partials, then one fused pass per group that sums them itself (2 launches for one
    group). Returns (the squared norm used, the nonfinite flag)."""
    rho, eps = p.rho, p.eps
    k = _kernels()
    dev = theta[0].device
    sq_in, parts, n_parts, sq_dtype, from_parts = _sq_source(g, sq)
    sq_out = torch.empty((), dtype=sq_dtype, device=dev)
    flag = torch.empty((), dtype=torch.int8, device=dev)
    for i, (t, b, gg) in enumerate(zip(theta, backup, g)):
        n = t.numel()
        if n == 0 and i > 0:
            continue
        k._perturb_kernel[_ew_grid(n, dev)](
            t,
            b,
            gg,
            sq_in,
            parts,
            n_parts,
            sq_out,
            flag,
            n,
            rho,
            eps,
            WRITE_FLAG=i == 0,
            **_norm_pass_meta(t, sq_dtype, from_parts),
        )
    return sq_out, flag.view(torch.bool)


def restore_(theta, backup):
    k = _kernels()
    for t, b in zip(theta, backup):
        n = t.numel()
        if n == 0:
            continue
        # bit patterns, not values: the copy is bitwise whatever the float format (NaN payloads included)
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        k._restore_kernel[(_cdiv(n, BLOCK_EW),)](
            t.view(bits), b.view(bits), n, BLOCK=BLOCK_EW, num_warps=NUM_WARPS
        )


def antibody_combine_(out, g_a, g_h, g_p, g_r, lambda_t, lambda_ref, p: CombineParams):
    """One launch per group."""
    lt_v, lr_v = p.lambda_t_value, p.lambda_ref_value
    k = _kernels()
    for i, o in enumerate(out):
        n = o.numel()
        if n == 0:
            continue
        fp64 = _is_fp64(o)
        lt, lr = lambda_t, lambda_ref
        if fp64:
            # scalar kernel arguments are fp32: keep fp64 lambdas exact by passing them in device memory
            lt = lt if lt is not None else torch.full((), lt_v, dtype=torch.float64, device=o.device)
            lr = lr if lr is not None else torch.full((), lr_v, dtype=torch.float64, device=o.device)
        has_r = bool(g_r)
        k._antibody_combine_kernel[(_cdiv(n, BLOCK_EW),)](
            o,
            g_a[i],
            g_h[i],
            g_p[i],
            g_r[i] if has_r else o,
            lt if lt is not None else o,
            lr if lr is not None else o,
            lt_v,
            lr_v,
            n,
            BLOCK=BLOCK_EW,
            HAS_R=has_r,
            LT_TENSOR=lt is not None,
            LR_TENSOR=lr is not None,
            IS_FP64=fp64,
            num_warps=NUM_WARPS,
        )


def clip_(g, sq, p: ClipParams):
    """Without ``sq``: the partials, then one fused pass per group (2 launches). Returns the fp32 norm."""
    max_norm = p.max_norm
    k = _kernels()
    dev = g[0].device
    sq_in, parts, n_parts, sq_dtype, from_parts = _sq_source(g, sq)
    norm = torch.empty((), dtype=torch.float32, device=dev)
    for i, x in enumerate(g):
        n = x.numel()
        if n == 0 and i > 0:
            continue
        k._clip_kernel[_ew_grid(n, dev)](
            x,
            sq_in,
            parts,
            n_parts,
            norm,
            n,
            max_norm,
            WRITE_NORM=i == 0,
            **_norm_pass_meta(x, sq_dtype, from_parts),
        )
    return norm
