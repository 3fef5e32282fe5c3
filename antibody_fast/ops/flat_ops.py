"""Fused vector ops on flat trainable-parameter / gradient buffers (docs/design.md §2.2, §3).

Every op here works on *flat tensors*: either one contiguous 1-D tensor, or a list of them (one per dtype
group of :class:`antibody_fast.flat.FlatParameters`); a list is treated as the concatenation of its
members, so norms and dot products are global over the whole list. Every scalar result stays on the
device: none of these functions synchronises with the host (no ``.item()``, no ``bool(tensor)``).

Public ops (``impl="auto"|"triton"|"cpp"|"torch"``, see :mod:`antibody_fast.dispatch`):

* ``sq_norm(g)``: ``sum(g**2)`` as a 0-dim fp32 tensor (all-reduced over ``group``);
* ``perturb_(flat, g, rho)``: ``theta <- theta - rho*g/(||g||+eps)``; returns a :class:`PerturbBackup`;
* ``restore_(flat, backup)``: ``theta <- backup``, bit for bit;
* ``grad_dots(a, h, p)``: ``[<a, h-p>, ||a||^2, ||h-p||^2]`` (fp32 ``[3]``) in one pass;
* ``antibody_combine_(out, a, h, p, r, lambda_t, lambda_ref)``: ``out <- a + lambda_t*(h-p) + lambda_ref*r``
  (``out`` may alias ``a``);
* ``clip_(g, max_norm)``: ``g *= min(1, max_norm/(||g||+1e-6))`` (torch ``clip_grad_norm_``); returns ``||g||``.

Every op is a ``torch.library`` custom op under ``torch.ops.antibody_fast`` (``sq_norm``, ``grad_dots``,
``perturb_apply``, ``restore``, ``antibody_combine``, ``clip_scale``) whose CPU kernel runs the C++
(``torch.ops.antibody_fast_cpp.flat_*``), torch, or -- under ``TRITON_INTERPRET=1`` -- Triton
implementation, and whose CUDA kernel runs Triton or torch.

Launches (Triton, one dtype group): ``sq_norm`` and ``grad_dots`` 2 (per-program fp64 partial sums of a
persistent grid, then one ordered sum: deterministic); ``perturb_`` and ``clip_`` 2 (the partial sums, then
one persistent elementwise pass whose programs each re-sum the few partials, so the norm never goes through
the host nor through an extra launch); ``restore_`` and ``antibody_combine_`` 1. With a process group the
squared norm is finalised and all-reduced first and the elementwise pass reads it from device memory.

Arithmetic is done in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64 inputs) and the result is rounded
once to the storage dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..dispatch import OpSpec, register_op, resolve_impl, triton_interpret

FlatTensors = torch.Tensor | Sequence[torch.Tensor]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# public op name -> C++ op name under torch.ops.antibody_fast_cpp
_CPP_NAMES = {
    "sq_norm": "flat_sq_norm",
    "perturb_": "flat_perturb",
    "restore_": "flat_restore",
    "grad_dots": "flat_grad_dots",
    "antibody_combine_": "flat_combine",
    "clip_": "flat_clip_scale",
}
for _name, _cpp in _CPP_NAMES.items():
    register_op(
        OpSpec(
            name=_name,
            cpp_name=_cpp,
            triton_module="flat_ops",
            doc="fused op on flat parameter/gradient buffers (antibody_fast.ops.flat_ops)",
        )
    )


# ----------------------------------------------------------------------------------------------------------
# input normalisation and validation (no host sync: only metadata is inspected)
# ----------------------------------------------------------------------------------------------------------
def _as_list(x: FlatTensors, what: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        xs = [x]
    elif isinstance(x, (list, tuple)):
        xs = list(x)
    else:
        raise TypeError(f"{what}: expected a Tensor or a list of Tensors, got {type(x).__name__}")
    if not xs:
        raise ValueError(f"{what}: empty list of flat tensors")
    for i, t in enumerate(xs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}]: expected a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{what}[{i}]: dtype {t.dtype} is not supported (float32/float16/bfloat16/float64)"
            )
        if t.dim() != 1:
            raise ValueError(f"{what}[{i}]: expected a 1-D flat tensor, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{what}[{i}]: flat tensors must be contiguous")
        if t.layout != torch.strided:
            raise ValueError(f"{what}[{i}]: layout {t.layout} is not supported (dense tensors only)")
    dev = xs[0].device
    for i, t in enumerate(xs):
        if t.device != dev:
            raise ValueError(
                f"{what}: all flat tensors must be on one device, got {dev} and {t.device} (index {i})"
            )
    return xs


def _check_like(ref: list[torch.Tensor], other: list[torch.Tensor], ref_name: str, name: str) -> None:
    if len(other) != len(ref):
        raise ValueError(f"{name}: {len(other)} flat tensors but {ref_name} has {len(ref)}")
    for i, (r, o) in enumerate(zip(ref, other)):
        if o.numel() != r.numel():
            raise ValueError(
                f"{name}[{i}]: numel {o.numel()} does not match {ref_name}[{i}] numel {r.numel()}"
            )
        if o.dtype != r.dtype:
            raise ValueError(f"{name}[{i}]: dtype {o.dtype} does not match {ref_name}[{i}] dtype {r.dtype}")
        if o.device != r.device:
            raise ValueError(
                f"{name}[{i}]: device {o.device} does not match {ref_name}[{i}] device {r.device}"
            )


def _check_no_grad(xs: list[torch.Tensor], name: str) -> None:
    for i, t in enumerate(xs):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name}[{i}] requires grad: in-place flat ops need plain buffers (use FlatParameters.params, "
                "or run under torch.no_grad())"
            )


def _resolve(op: str, impl: str, xs: list[torch.Tensor]) -> str:
    return resolve_impl(op, impl, xs[0].device, xs[0].dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return t
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _scalar_arg(value, name: str, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """A python number -> (None, value); a 0-dim/1-element tensor on ``device`` -> (tensor, 0.0)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name}: expected a python float or a 1-element tensor, got shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"{name}: tensor on {value.device} but the flat buffers are on {device}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: unsupported dtype {value.dtype}")
        return value.detach().reshape(()), 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a python float or a tensor, got {type(value).__name__}")
    return None, float(value)


# ----------------------------------------------------------------------------------------------------------
# torch reference implementations (also the fallback of ``auto``)
# ----------------------------------------------------------------------------------------------------------
def _sq_dtype(xs: list[torch.Tensor]) -> torch.dtype:
    """dtype of the internal squared norm: fp64 when any buffer is fp64 (keeps fp64 exact), else fp32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _ref_sq_norm(xs: list[torch.Tensor]) -> torch.Tensor:
    out_dtype = _sq_dtype(xs)
    total = None
    for x in xs:
        acc = _acc_dtype(x.dtype)
        # x*x then a (cascade) sum: torch.linalg.vector_norm / torch.dot lose ~1e-4 relative at 1e6 elements
        part = x.to(acc).square().sum().to(out_dtype)
        total = part if total is None else total + part
    return total


def _ref_grad_dots(a: list[torch.Tensor], h: list[torch.Tensor], p: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(
        3, dtype=torch.float64 if a[0].dtype == torch.float64 else torch.float32, device=a[0].device
    )
    for ga, gh, gp in zip(a, h, p):
        acc = _acc_dtype(ga.dtype)
        ga = ga.to(acc)
        gs = gh.to(acc) - gp.to(acc)
        out += torch.stack([(ga * gs).sum(), ga.square().sum(), gs.square().sum()]).to(out.dtype)
    return out.to(torch.float32)


def _perturb_scale(
    sq: torch.Tensor, rho: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale fp32 0-dim, apply bool 0-dim, nonfinite bool 0-dim) from the squared norm, on the device."""
    finite = torch.isfinite(sq)
    norm = sq.sqrt()
    ok = finite & (sq > 0)
    scale = torch.where(ok, rho / (norm + eps), torch.zeros_like(norm))
    return scale, ok, ~finite


def _ref_perturb(theta, backup, g, sq, rho, eps) -> torch.Tensor:
    scale, ok, nonfinite = _perturb_scale(sq, rho, eps)
    for t, b, gg in zip(theta, backup, g):
        b.copy_(t)
        acc = _acc_dtype(t.dtype)
        new = (t.to(acc) - scale.to(acc) * gg.to(acc)).to(t.dtype)
        # select, not multiply by 0: 0 * inf would write NaN into theta
        t.copy_(torch.where(ok, new, t))
    return nonfinite


def _ref_restore(theta, backup) -> None:
    for t, b in zip(theta, backup):
        t.copy_(b)


def _ref_combine(out, a, h, p, r, lt_t, lt_v, lr_t, lr_v) -> None:
    for i, o in enumerate(out):
        acc = _acc_dtype(o.dtype)
        lt = lt_t.to(acc) if lt_t is not None else lt_v
        res = a[i].to(acc) + lt * (h[i].to(acc) - p[i].to(acc))
        if r:
            lr = lr_t.to(acc) if lr_t is not None else lr_v
            res = res + lr * r[i].to(acc)
        o.copy_(res.to(o.dtype))


def _clip_coef(sq: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    norm = sq.sqrt()
    return (max_norm / (norm + 1e-6)).clamp(max=1.0), norm


def _ref_clip_scale(g, sq, max_norm) -> torch.Tensor:
    coef, norm = _clip_coef(sq, max_norm)
    for x in g:
        acc = _acc_dtype(x.dtype)
        x.copy_((x.to(acc) * coef.to(acc)).to(x.dtype))
    return norm.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# C++ and Triton launchers
# ----------------------------------------------------------------------------------------------------------
def _cpp():
    from .._ext import cpp_ops

    return cpp_ops()


def _kernels():
    from ..kernels import flat_ops as k  # lazy: TRITON_INTERPRET must be set before the kernels are defined

    return k


_BLOCK_RED = 2048  # elements per program iteration of the reductions
_BLOCK_EW = 2048  # elements per program of the elementwise kernels
_NUM_WARPS = 8
_BLOCK_P = 1024  # partials summed per iteration by the finalize / fused elementwise kernels


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _max_programs(device: torch.device, per_sm: int) -> int:
    """Size of the persistent grids: ``per_sm`` programs per SM on CUDA, 16 under the interpreter."""
    return per_sm * _sm_count(device) if device.type == "cuda" else 16


def _is_fp64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _ew_grid(n: int, device: torch.device) -> tuple[int]:
    return (max(1, min(_max_programs(device, 8), triton_cdiv(n, _BLOCK_EW))),)


def _triton_partials(kind: str, groups: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, int]:
    """One launch per group: fp64 partial sums ``[K, total]`` of a persistent grid (K=1 "sq", K=3 "dots")."""
    k = _kernels()
    dev = groups[0][0].device
    cap = _max_programs(dev, 4)
    nprogs = [max(1, min(cap, triton_cdiv(g[0].numel(), _BLOCK_RED))) for g in groups]
    total = sum(nprogs)
    K = 1 if kind == "sq" else 3
    parts = torch.empty((K, total), dtype=torch.float64, device=dev)
    off = 0
    for g, P in zip(groups, nprogs):
        n = g[0].numel()
        if kind == "sq":
            k._sq_norm_partial_kernel[(P,)](
                g[0], parts, n, off, BLOCK=_BLOCK_RED, IS_FP64=_is_fp64(g[0]), num_warps=_NUM_WARPS
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
                BLOCK=_BLOCK_RED,
                IS_FP64=_is_fp64(g[0]),
                num_warps=_NUM_WARPS,
            )
        off += P
    return parts, total


def _triton_finalize(parts: torch.Tensor, total: int, out_dtype: torch.dtype) -> torch.Tensor:
    """One launch: the ordered sum of the partials, ``[K]`` in ``out_dtype``."""
    K = parts.shape[0]
    out = torch.empty((K,), dtype=out_dtype, device=parts.device)
    _kernels()._sum_partials_kernel[(1,)](parts, out, total, total, K=K, BLOCK_P=_BLOCK_P, num_warps=4)
    return out


def _triton_sq_norm(xs):
    parts, total = _triton_partials("sq", [(x,) for x in xs])
    return _triton_finalize(parts, total, _sq_dtype(xs)).reshape(())


def _triton_grad_dots(a, h, p):
    parts, total = _triton_partials("dots", list(zip(a, h, p)))
    return _triton_finalize(parts, total, torch.float32)


def _triton_sq_source(g, sq):
    """(sq or dummy, partials or dummy, n_parts, sq dtype, from_parts): without a given squared norm the
    elementwise kernels sum the partials themselves (no finalize launch)."""
    if sq is not None:
        return sq, sq, 0, sq.dtype, False
    parts, total = _triton_partials("sq", [(x,) for x in g])
    return parts, parts, total, _sq_dtype(g), True


def _triton_perturb(theta, backup, g, sq, rho, eps):
    k = _kernels()
    dev = theta[0].device
    sq_in, parts, n_parts, sq_dtype, from_parts = _triton_sq_source(g, sq)
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
            BLOCK=_BLOCK_EW,
            IS_FP64=_is_fp64(t),
            WRITE_FLAG=i == 0,
            SQ_FP64=sq_dtype == torch.float64,
            FROM_PARTS=from_parts,
            BLOCK_P=_BLOCK_P,
            num_warps=_NUM_WARPS,
        )
    return sq_out, flag.view(torch.bool)


def _triton_restore(theta, backup):
    k = _kernels()
    for t, b in zip(theta, backup):
        n = t.numel()
        if n == 0:
            continue
        # bit patterns, not values: the copy is bitwise whatever the float format (NaN payloads included)
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        k._copy_kernel[(triton_cdiv(n, _BLOCK_EW),)](
            t.view(bits), b.view(bits), n, BLOCK=_BLOCK_EW, num_warps=_NUM_WARPS
        )


def _triton_combine(out, a, h, p, r, lt_t, lt_v, lr_t, lr_v):
    k = _kernels()
    for i, o in enumerate(out):
        n = o.numel()
        if n == 0:
            continue
        fp64 = _is_fp64(o)
        lt, lr = lt_t, lr_t
        if fp64:
            # scalar kernel arguments are fp32: keep fp64 lambdas exact by passing them in device memory
            lt = lt if lt is not None else torch.full((), lt_v, dtype=torch.float64, device=o.device)
            lr = lr if lr is not None else torch.full((), lr_v, dtype=torch.float64, device=o.device)
        has_r = bool(r)
        k._combine_kernel[(triton_cdiv(n, _BLOCK_EW),)](
            o,
            a[i],
            h[i],
            p[i],
            r[i] if has_r else o,
            lt if lt is not None else o,
            lr if lr is not None else o,
            lt_v,
            lr_v,
            n,
            BLOCK=_BLOCK_EW,
            HAS_R=has_r,
            LT_TENSOR=lt is not None,
            LR_TENSOR=lr is not None,
            IS_FP64=fp64,
            num_warps=_NUM_WARPS,
        )


def _triton_clip_scale(g, sq, max_norm):
    k = _kernels()
    dev = g[0].device
    sq_in, parts, n_parts, sq_dtype, from_parts = _triton_sq_source(g, sq)
    norm = torch.empty((), dtype=torch.float32, device=dev)
    for i, x in enumerate(g):
        n = x.numel()
        if n == 0 and i > 0:
            continue
        k._clip_scale_kernel[_ew_grid(n, dev)](
            x,
            sq_in,
            parts,
            n_parts,
            norm,
            n,
            max_norm,
            BLOCK=_BLOCK_EW,
            IS_FP64=_is_fp64(x),
            WRITE_NORM=i == 0,
            SQ_FP64=sq_dtype == torch.float64,
            FROM_PARTS=from_parts,
            BLOCK_P=_BLOCK_P,
            num_warps=_NUM_WARPS,
        )
    return norm


def _check_impl_device(impl: str, device: torch.device) -> None:
    if impl == "triton" and device.type == "cpu" and not triton_interpret():
        raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1")
    if impl == "cpp" and device.type != "cpu":
        raise RuntimeError("impl='cpp' runs on CPU tensors only")


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("antibody_fast::sq_norm", mutates_args=())
def _sq_norm_op(xs: list[torch.Tensor], impl: str) -> torch.Tensor:
    _check_impl_device(impl, xs[0].device)
    if impl == "cpp":
        return _cpp().flat_sq_norm(xs)
    if impl == "triton":
        return _triton_sq_norm(xs)
    return _ref_sq_norm(xs)


@_sq_norm_op.register_fake
def _(xs, impl):
    return xs[0].new_empty((), dtype=_sq_dtype(xs))


@torch.library.custom_op("antibody_fast::grad_dots", mutates_args=())
def _grad_dots_op(
    g_a: list[torch.Tensor], g_h: list[torch.Tensor], g_p: list[torch.Tensor], impl: str
) -> torch.Tensor:
    _check_impl_device(impl, g_a[0].device)
    if impl == "cpp":
        return _cpp().flat_grad_dots(g_a, g_h, g_p)
    if impl == "triton":
        return _triton_grad_dots(g_a, g_h, g_p)
    return _ref_grad_dots(g_a, g_h, g_p)


@_grad_dots_op.register_fake
def _(g_a, g_h, g_p, impl):
    return g_a[0].new_empty((3,), dtype=torch.float32)


@torch.library.custom_op("antibody_fast::perturb_apply", mutates_args=("theta", "backup"))
def _perturb_op(
    theta: list[torch.Tensor],
    backup: list[torch.Tensor],
    g: list[torch.Tensor],
    sq_norm: torch.Tensor | None,
    rho: float,
    eps: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (squared norm used, nonfinite flag). Without ``sq_norm`` the op computes it (Triton: fused,
    two launches in all for one group)."""
    _check_impl_device(impl, theta[0].device)
    if impl == "triton":
        return _triton_perturb(theta, backup, g, sq_norm, rho, eps)
    if impl == "cpp":
        sq = _cpp().flat_sq_norm(g) if sq_norm is None else sq_norm.clone()
        return sq, _cpp().flat_perturb(theta, backup, g, sq, rho, eps)
    sq = _ref_sq_norm(g) if sq_norm is None else sq_norm.clone()
    return sq, _ref_perturb(theta, backup, g, sq, rho, eps)


@_perturb_op.register_fake
def _(theta, backup, g, sq_norm, rho, eps, impl):
    sq = g[0].new_empty((), dtype=_sq_dtype(g) if sq_norm is None else sq_norm.dtype)
    return sq, g[0].new_empty((), dtype=torch.bool)


@torch.library.custom_op("antibody_fast::restore", mutates_args=("theta",))
def _restore_op(theta: list[torch.Tensor], backup: list[torch.Tensor], impl: str) -> None:
    _check_impl_device(impl, theta[0].device)
    if impl == "cpp":
        _cpp().flat_restore(theta, backup)
    elif impl == "triton":
        _triton_restore(theta, backup)
    else:
        _ref_restore(theta, backup)


@_restore_op.register_fake
def _(theta, backup, impl):
    return None


@torch.library.custom_op("antibody_fast::antibody_combine", mutates_args=("out",))
def _combine_op(
    out: list[torch.Tensor],
    g_a: list[torch.Tensor],
    g_h: list[torch.Tensor],
    g_p: list[torch.Tensor],
    g_r: list[torch.Tensor],
    lambda_t: torch.Tensor | None,
    lambda_t_value: float,
    lambda_ref: torch.Tensor | None,
    lambda_ref_value: float,
    impl: str,
) -> None:
    _check_impl_device(impl, out[0].device)
    if impl == "cpp":
        _cpp().flat_combine(out, g_a, g_h, g_p, g_r, lambda_t, lambda_t_value, lambda_ref, lambda_ref_value)
    elif impl == "triton":
        _triton_combine(out, g_a, g_h, g_p, g_r, lambda_t, lambda_t_value, lambda_ref, lambda_ref_value)
    else:
        _ref_combine(out, g_a, g_h, g_p, g_r, lambda_t, lambda_t_value, lambda_ref, lambda_ref_value)


@_combine_op.register_fake
def _(out, g_a, g_h, g_p, g_r, lambda_t, lambda_t_value, lambda_ref, lambda_ref_value, impl):
    return None


@torch.library.custom_op("antibody_fast::clip_scale", mutates_args=("g",))
def _clip_scale_op(
    g: list[torch.Tensor], sq_norm: torch.Tensor | None, max_norm: float, impl: str
) -> torch.Tensor:
    """Returns the fp32 norm. Without ``sq_norm`` the op computes it (Triton: fused, two launches)."""
    _check_impl_device(impl, g[0].device)
    if impl == "triton":
        return _triton_clip_scale(g, sq_norm, max_norm)
    if impl == "cpp":
        sq = _cpp().flat_sq_norm(g) if sq_norm is None else sq_norm
        return _cpp().flat_clip_scale(g, sq, max_norm)
    sq = _ref_sq_norm(g) if sq_norm is None else sq_norm
    return _ref_clip_scale(g, sq, max_norm)


@_clip_scale_op.register_fake
def _(g, sq_norm, max_norm, impl):
    return g[0].new_empty((), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def sq_norm(g: FlatTensors, group=None, *, impl: str = "auto") -> torch.Tensor:
    """Global squared L2 norm ``sum_i g_i**2`` of flat tensor(s), accumulated in fp32 (fp64 for fp64 input).

    Args:
        g: a 1-D contiguous tensor ``[N]`` (fp32/fp16/bf16/fp64) or a list of them (dtype groups, one device).
        group: optional ``torch.distributed`` process group; the local partial sum is all-reduced (SUM), so
            sharded parameters (FSDP/ZeRO) get the global norm.
        impl: ``"auto"|"triton"|"cpp"|"torch"``.

    Returns:
        0-dim fp32 tensor on ``g``'s device (``inf``/``nan`` propagate). No host sync.
    """
    xs = _as_list(g, "sq_norm: g")
    impl = _resolve("sq_norm", impl, xs)
    out = _all_reduce(_sq_norm_op(xs, impl), group)
    return out if out.dtype == torch.float32 else out.to(torch.float32)


@dataclass
class PerturbBackup:
    """What :func:`perturb_` returns and :func:`restore_` consumes.

    Attributes:
        data: bitwise copies of the parameter buffers before the perturbation (same dtypes/numels).
        sq_norm: 0-dim ``||g||**2`` used for the perturbation (on the device): fp32, or fp64 when a buffer
            is fp64 (so that fp64 buffers are perturbed exactly); ``.norm`` is its sqrt.
        nonfinite: 0-dim bool, True when ``||g||`` was inf/nan and the perturbation was skipped.
    """

    data: list[torch.Tensor]
    sq_norm: torch.Tensor
    nonfinite: torch.Tensor

    @property
    def norm(self) -> torch.Tensor:
        """0-dim fp32 ``||g||`` (computed on demand: one small launch)."""
        return self.sq_norm.sqrt().to(torch.float32)


def perturb_(
    flat: FlatTensors,
    g: FlatTensors,
    rho: float,
    eps: float = 1e-7,
    *,
    group=None,
    out: Sequence[torch.Tensor] | None = None,
    impl: str = "auto",
) -> PerturbBackup:
    """In place ``theta <- theta - rho * g / (||g|| + eps)`` with a bitwise backup of ``theta``.

    ``||g||`` is the global L2 norm over all of ``g`` (all-reduced over ``group`` when given). The scale
    ``rho/(||g||+eps)`` is computed on the device: a zero gradient gives scale 0 (theta unchanged, no NaN);
    a non-finite norm also gives scale 0 and sets ``backup.nonfinite`` -- NaN is never written into theta.

    Args:
        flat: parameter buffer(s) ``[N_k]`` (fp32/fp16/bf16/fp64), modified in place.
        g: direction, same numels/dtypes/device as ``flat``.
        rho: perturbation radius (python float).
        eps: added to the norm.
        out: optional preallocated backup buffers (same numels/dtypes/device), reused to avoid allocation.
        impl: ``"auto"|"triton"|"cpp"|"torch"``.

    Returns:
        :class:`PerturbBackup` to pass to :func:`restore_`. No host sync.
    """
    theta = _as_list(flat, "perturb_: flat")
    gs = _as_list(g, "perturb_: g")
    _check_like(theta, gs, "flat", "perturb_: g")
    _check_no_grad(theta, "perturb_: flat")
    for name, v in (("rho", rho), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"perturb_: {name} must be a python float, got {type(v).__name__}")
    if out is None:
        backup = [torch.empty_like(t) for t in theta]
    else:
        backup = _as_list(list(out), "perturb_: out")
        _check_like(theta, backup, "flat", "perturb_: out")
        for i, (t, b) in enumerate(zip(theta, backup)):
            if b.data_ptr() == t.data_ptr():
                raise ValueError(f"perturb_: out[{i}] aliases flat[{i}]")
    impl = _resolve("perturb_", impl, theta)
    # without a group the op computes the norm itself (Triton: partial sums + one fused pass = 2 launches)
    sq = None if group is None else _all_reduce(_sq_norm_op(gs, impl), group)
    sq, nonfinite = _perturb_op(theta, backup, gs, sq, float(rho), float(eps), impl)
    return PerturbBackup(data=backup, sq_norm=sq, nonfinite=nonfinite)


def restore_(flat: FlatTensors, backup: PerturbBackup | FlatTensors, *, impl: str = "auto") -> None:
    """Copy the backup back into ``flat`` bit for bit (undoes :func:`perturb_`).

    Args:
        flat: parameter buffer(s) ``[N_k]`` modified in place.
        backup: a :class:`PerturbBackup` or flat tensor(s) with the same numels/dtypes/device.
    """
    theta = _as_list(flat, "restore_: flat")
    data = backup.data if isinstance(backup, PerturbBackup) else backup
    bs = _as_list(data, "restore_: backup")
    _check_like(theta, bs, "flat", "restore_: backup")
    _check_no_grad(theta, "restore_: flat")
    impl = _resolve("restore_", impl, theta)
    _restore_op(theta, bs, impl)


def grad_dots(
    g_a: FlatTensors, g_h: FlatTensors, g_p: FlatTensors, *, group=None, impl: str = "auto"
) -> torch.Tensor:
    """``[<g_a, g_s>, ||g_a||^2, ||g_s||^2]`` with ``g_s = g_h - g_p``, in one pass over the three inputs.

    Args:
        g_a, g_h, g_p: flat tensor(s) with identical numels/dtypes/device (fp32/fp16/bf16/fp64).
        group: optional process group; the three partial sums are all-reduced.

    Returns:
        fp32 tensor ``[3]`` on the device (accumulated in fp32; fp64 for fp64 input). No host sync.
    """
    a = _as_list(g_a, "grad_dots: g_a")
    h = _as_list(g_h, "grad_dots: g_h")
    p = _as_list(g_p, "grad_dots: g_p")
    _check_like(a, h, "g_a", "grad_dots: g_h")
    _check_like(a, p, "g_a", "grad_dots: g_p")
    impl = _resolve("grad_dots", impl, a)
    return _all_reduce(_grad_dots_op(a, h, p, impl), group)


def antibody_combine_(
    out: FlatTensors,
    g_a: FlatTensors,
    g_h: FlatTensors,
    g_p: FlatTensors,
    g_r: FlatTensors | None,
    lambda_t: float | torch.Tensor,
    lambda_ref: float | torch.Tensor = 0.0,
    *,
    impl: str = "auto",
) -> None:
    """``out <- g_a + lambda_t * (g_h - g_p) + lambda_ref * g_r`` elementwise, computed in fp32.

    Args:
        out: destination flat tensor(s), may alias ``g_a`` (e.g. the flat grad buffer holding g_a).
        g_a, g_h, g_p: flat tensor(s) with the numels/dtypes/device of ``out``.
        g_r: like ``g_a``, or None (Booster: the ``lambda_ref`` term is dropped).
        lambda_t, lambda_ref: python floats or 1-element tensors on the device (e.g. an EMA state); read
            on the device, no host sync.
    """
    o = _as_list(out, "antibody_combine_: out")
    a = _as_list(g_a, "antibody_combine_: g_a")
    h = _as_list(g_h, "antibody_combine_: g_h")
    p = _as_list(g_p, "antibody_combine_: g_p")
    for name, x in (("g_a", a), ("g_h", h), ("g_p", p)):
        _check_like(o, x, "out", f"antibody_combine_: {name}")
    r: list[torch.Tensor] = []
    if g_r is not None:
        r = _as_list(g_r, "antibody_combine_: g_r")
        _check_like(o, r, "out", "antibody_combine_: g_r")
    _check_no_grad(o, "antibody_combine_: out")
    for name, x in (("g_h", h), ("g_p", p), ("g_r", r)):
        for i, t in enumerate(x):
            if t.data_ptr() == o[i].data_ptr() and t.numel():
                raise ValueError(f"antibody_combine_: out[{i}] may alias g_a only, not {name}[{i}]")
    dev = o[0].device
    lt_t, lt_v = _scalar_arg(lambda_t, "antibody_combine_: lambda_t", dev)
    lr_t, lr_v = _scalar_arg(lambda_ref, "antibody_combine_: lambda_ref", dev)
    impl = _resolve("antibody_combine_", impl, o)
    _combine_op(o, a, h, p, r, lt_t, lt_v, lr_t, lr_v, impl)


def clip_(g: FlatTensors, max_norm: float, group=None, *, impl: str = "auto") -> torch.Tensor:
    """Clip the global norm in place: ``g *= min(1, max_norm / (||g|| + 1e-6))``.

    Same semantics as ``torch.nn.utils.clip_grad_norm_(..., error_if_nonfinite=False)``: a non-finite norm
    makes the scale NaN/0 as in torch. With ``group`` the squared norm is all-reduced first.

    Args:
        g: flat gradient tensor(s) ``[N_k]`` modified in place.
        max_norm: python float > 0.

    Returns:
        0-dim fp32 total norm (before clipping), on the device. No host sync.
    """
    xs = _as_list(g, "clip_: g")
    _check_no_grad(xs, "clip_: g")
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"clip_: max_norm must be a python float, got {type(max_norm).__name__}")
    impl = _resolve("clip_", impl, xs)
    sq = None if group is None else _all_reduce(_sq_norm_op(xs, impl), group)
    return _clip_scale_op(xs, sq, float(max_norm), impl)


# ----------------------------------------------------------------------------------------------------------
# references under the house naming (``<op>_reference``): same semantics, pure torch, fp32 accumulation
# ----------------------------------------------------------------------------------------------------------
def sq_norm_reference(g: FlatTensors) -> torch.Tensor:
    return _ref_sq_norm(_as_list(g, "g"))


def grad_dots_reference(g_a: FlatTensors, g_h: FlatTensors, g_p: FlatTensors) -> torch.Tensor:
    return _ref_grad_dots(_as_list(g_a, "g_a"), _as_list(g_h, "g_h"), _as_list(g_p, "g_p"))


def perturb_reference(flat: FlatTensors, g: FlatTensors, rho: float, eps: float = 1e-7) -> list[torch.Tensor]:
    """Out of place: the perturbed copies of ``flat``."""
    theta = [t.clone() for t in _as_list(flat, "flat")]
    gs = _as_list(g, "g")
    _ref_perturb(theta, [torch.empty_like(t) for t in theta], gs, _ref_sq_norm(gs), rho, eps)
    return theta


def antibody_combine_reference(g_a, g_h, g_p, g_r, lambda_t, lambda_ref=0.0) -> list[torch.Tensor]:
    """Out of place combine."""
    a = _as_list(g_a, "g_a")
    out = [torch.empty_like(t) for t in a]
    r = [] if g_r is None else _as_list(g_r, "g_r")
    lt_t, lt_v = _scalar_arg(lambda_t, "lambda_t", a[0].device)
    lr_t, lr_v = _scalar_arg(lambda_ref, "lambda_ref", a[0].device)
    _ref_combine(out, a, _as_list(g_h, "g_h"), _as_list(g_p, "g_p"), r, lt_t, lt_v, lr_t, lr_v)
    return out


def clip_reference(g: FlatTensors, max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Out of place: (clipped copies, total norm)."""
    xs = [t.clone() for t in _as_list(g, "g")]
    norm = _ref_clip_scale(xs, _ref_sq_norm(xs), max_norm)
    return xs, norm


__all__ = [
    "FlatTensors",
    "PerturbBackup",
    "sq_norm",
    "perturb_",
    "restore_",
    "grad_dots",
    "antibody_combine_",
    "clip_",
    "sq_norm_reference",
    "grad_dots_reference",
    "perturb_reference",
    "antibody_combine_reference",
    "clip_reference",
]
