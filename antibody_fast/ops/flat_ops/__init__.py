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

Every op is a ``torch.library`` custom op of the same name under ``torch.ops.antibody_fast`` whose CPU kernel
runs the C++ (``torch.ops.antibody_fast_cpp.<op>``), torch, or -- under ``TRITON_INTERPRET=1`` -- Triton
implementation, and whose CUDA kernel runs Triton or torch. Layers (CONTRIBUTING.md "Adding an op"):
``_validate.py`` (input checks), ``_torch.py`` (the torch twin, the params dataclasses and the references),
``_triton.py`` (launchers of ``kernels/flat_ops.py``), ``_cpp.py`` (binding to ``csrc/flat_ops.cpp``),
``_register.py`` (the custom ops and their fakes). Importing this package registers the ops; it does not import
triton.

Launches (Triton, one dtype group): ``sq_norm`` and ``grad_dots`` 2 (per-program fp64 partial sums of a
persistent grid, then one ordered sum: deterministic); ``perturb_`` and ``clip_`` 2 (the partial sums, then
one persistent elementwise pass whose programs each re-sum the few partials, so the norm never goes through
the host nor through an extra launch); ``restore_`` and ``antibody_combine_`` 1. With a process group the
squared norm is finalised and all-reduced first and the elementwise pass reads it from device memory.

Arithmetic is done in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64 inputs) and the result is rounded
once to the storage dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...dispatch import resolve_impl
from . import _register
from ._torch import (
    antibody_combine_reference,
    clip_reference,
    grad_dots_reference,
    perturb_reference,
    sq_norm_reference,
)

# the Triton launch configuration, public for antibody_fast.gpu_compile (it compiles what the launchers allow)
from ._triton import BLOCK_EW, BLOCK_P, BLOCK_RED, NUM_WARPS  # noqa: F401
from ._validate import FlatTensors, as_list, check_like, check_no_grad, scalar_arg

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


def _resolve(op: str, impl: str, xs: list[torch.Tensor]) -> str:
    return resolve_impl(op, impl, xs[0].device, xs[0].dtype)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return t
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


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
    xs = as_list(g, "sq_norm: g")
    impl = _resolve("sq_norm", impl, xs)
    out = _all_reduce(_register.sq_norm(xs, impl), group)
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
    theta = as_list(flat, "perturb_: flat")
    gs = as_list(g, "perturb_: g")
    check_like(theta, gs, "flat", "perturb_: g")
    check_no_grad(theta, "perturb_: flat")
    for name, v in (("rho", rho), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"perturb_: {name} must be a python float, got {type(v).__name__}")
    if out is None:
        backup = [torch.empty_like(t) for t in theta]
    else:
        backup = as_list(list(out), "perturb_: out")
        check_like(theta, backup, "flat", "perturb_: out")
        for i, (t, b) in enumerate(zip(theta, backup)):
            if b.data_ptr() == t.data_ptr() and t.numel():  # empty tensors (an empty local shard) share ptr 0
                raise ValueError(f"perturb_: out[{i}] aliases flat[{i}]")
    impl = _resolve("perturb_", impl, theta)
    # without a group the op computes the norm itself (Triton: partial sums + one fused pass = 2 launches)
    sq = None if group is None else _all_reduce(_register.sq_norm(gs, impl), group)
    sq, nonfinite = _register.perturb_(theta, backup, gs, sq, float(rho), float(eps), impl)
    return PerturbBackup(data=backup, sq_norm=sq, nonfinite=nonfinite)


def restore_(flat: FlatTensors, backup: PerturbBackup | FlatTensors, *, impl: str = "auto") -> None:
    """Copy the backup back into ``flat`` bit for bit (undoes :func:`perturb_`).

    Args:
        flat: parameter buffer(s) ``[N_k]`` modified in place.
        backup: a :class:`PerturbBackup` or flat tensor(s) with the same numels/dtypes/device.
    """
    theta = as_list(flat, "restore_: flat")
    data = backup.data if isinstance(backup, PerturbBackup) else backup
    bs = as_list(data, "restore_: backup")
    check_like(theta, bs, "flat", "restore_: backup")
    check_no_grad(theta, "restore_: flat")
    impl = _resolve("restore_", impl, theta)
    _register.restore_(theta, bs, impl)


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
    a = as_list(g_a, "grad_dots: g_a")
    h = as_list(g_h, "grad_dots: g_h")
    p = as_list(g_p, "grad_dots: g_p")
    check_like(a, h, "g_a", "grad_dots: g_h")
    check_like(a, p, "g_a", "grad_dots: g_p")
    impl = _resolve("grad_dots", impl, a)
    return _all_reduce(_register.grad_dots(a, h, p, impl), group)


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
    o = as_list(out, "antibody_combine_: out")
    a = as_list(g_a, "antibody_combine_: g_a")
    h = as_list(g_h, "antibody_combine_: g_h")
    p = as_list(g_p, "antibody_combine_: g_p")
    for name, x in (("g_a", a), ("g_h", h), ("g_p", p)):
        check_like(o, x, "out", f"antibody_combine_: {name}")
    r: list[torch.Tensor] = []
    if g_r is not None:
        r = as_list(g_r, "antibody_combine_: g_r")
        check_like(o, r, "out", "antibody_combine_: g_r")
    check_no_grad(o, "antibody_combine_: out")
    for name, x in (("g_h", h), ("g_p", p), ("g_r", r)):
        for i, t in enumerate(x):
            if t.data_ptr() == o[i].data_ptr() and t.numel():
                raise ValueError(f"antibody_combine_: out[{i}] may alias g_a only, not {name}[{i}]")
    dev = o[0].device
    lt_t, lt_v = scalar_arg(lambda_t, "antibody_combine_: lambda_t", dev)
    lr_t, lr_v = scalar_arg(lambda_ref, "antibody_combine_: lambda_ref", dev)
    impl = _resolve("antibody_combine_", impl, o)
    _register.antibody_combine_(o, a, h, p, r, lt_t, lt_v, lr_t, lr_v, impl)


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
    xs = as_list(g, "clip_: g")
    check_no_grad(xs, "clip_: g")
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"clip_: max_norm must be a python float, got {type(max_norm).__name__}")
    impl = _resolve("clip_", impl, xs)
    sq = None if group is None else _all_reduce(_register.sq_norm(xs, impl), group)
    return _register.clip_(xs, sq, float(max_norm), impl)
