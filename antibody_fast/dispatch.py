"""Implementation dispatch shared by every op: ``impl="auto"|"triton"|"cpp"|"torch"``.

* ``auto``: Triton on CUDA, C++ on CPU, the pure-torch reference as the last resort.
* The environment variable ``ANTIBODY_FAST_IMPL`` replaces ``auto`` (the default) for every call.
* An explicit implementation that cannot run raises :class:`ImplUnavailableError` listing every reason
  (xformers' ``not_supported_reasons`` style).
* With ``TRITON_INTERPRET=1`` set before the kernels are imported, ``impl="triton"`` runs on CPU tensors
  (this is how CI tests the Triton kernels without a GPU). ``auto`` never picks the interpreter.

Nothing here initialises CUDA: only a tensor that already lives on CUDA leads to CUDA queries.

This module is the registry, not its client: it imports nothing from :mod:`antibody_fast.ops`. Each op package
registers its :class:`OpSpec` when it is imported (``ops/<op>/_register.py``), so a caller that wants every op
listed (``antibody_fast.info``) imports :mod:`antibody_fast.ops` first (docs/design.md §4).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._ext import extension_error

IMPLS = ("auto", "triton", "cpp", "torch")
_ENV = "ANTIBODY_FAST_IMPL"


class ImplUnavailableError(RuntimeError):
    """An explicitly requested implementation cannot run on the given inputs."""


@dataclass
class OpSpec:
    """What one op offers. ``cpp_name``: name under ``torch.ops.antibody_fast_cpp``;
    ``triton_module``: module under ``antibody_fast.kernels`` holding its ``@triton.jit`` kernels;
    ``extra_reasons(impl, device, dtype) -> list[str]``: op-specific limits."""

    name: str
    cpp_name: str | None = None
    triton_module: str | None = None
    extra_reasons: Callable[[str, torch.device, torch.dtype | None], list[str]] | None = None
    doc: str = ""
    impls: tuple[str, ...] = field(default=("triton", "cpp", "torch"))


_REGISTRY: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """Add (or replace) ``spec`` under ``spec.name``; called by each op package when it is imported."""
    _REGISTRY[spec.name] = spec
    return spec


def registered_ops() -> dict[str, OpSpec]:
    """The ops registered so far (import :mod:`antibody_fast.ops` first to have all of them)."""
    return dict(_REGISTRY)


def _spec(op: str) -> OpSpec:
    try:
        return _REGISTRY[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}") from None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def _triton_reasons(spec: OpSpec, device: torch.device) -> list[str]:
    reasons = []
    if spec.triton_module is None:
        reasons.append("no Triton kernel for this op")
    err = _triton_import_error()
    if err:
        reasons.append(err)
    if device.type == "cpu":
        if not triton_interpret():
            reasons.append(
                "CPU tensors need TRITON_INTERPRET=1 (set before antibody_fast.kernels is imported)"
            )
    elif device.type != "cuda":
        reasons.append(f"Triton kernels run on CUDA devices, not {device.type}")
    return reasons


def _cpp_reasons(spec: OpSpec, device: torch.device) -> list[str]:
    reasons = []
    if spec.cpp_name is None:
        reasons.append("no C++ kernel for this op")
    if device.type != "cpu":
        reasons.append(f"the C++ kernels are CPU-only (tensor is on {device.type})")
    err = extension_error()
    if err is not None:
        reasons.append(f"C++ extension not loaded ({err})")
    elif spec.cpp_name is not None and not hasattr(torch.ops.antibody_fast_cpp, spec.cpp_name):
        reasons.append(f"the loaded C++ extension has no op {spec.cpp_name!r} (rebuild it)")
    return reasons


# impl -> why it cannot run an op on a device (before the op's own ``extra_reasons``)
_IMPL_REASONS: dict[str, Callable[[OpSpec, torch.device], list[str]]] = {
    "triton": _triton_reasons,
    "cpp": _cpp_reasons,
    "torch": lambda spec, device: [],
}


def not_supported_reasons(
    op: str, impl: str, device: torch.device | str, dtype: torch.dtype | None = None
) -> list[str]:
    """Why ``impl`` cannot run ``op`` on ``device`` (empty list: it can)."""
    spec = _spec(op)
    device = torch.device(device)
    if impl not in spec.impls:
        return [f"{op} has no {impl!r} implementation"]
    reasons_of = _IMPL_REASONS.get(impl)
    if reasons_of is None:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    reasons = reasons_of(spec, device)
    if spec.extra_reasons is not None:
        reasons += spec.extra_reasons(impl, device, dtype)
    return reasons


def auto_order(device: torch.device) -> tuple[str, ...]:
    return ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")


def resolve_impl(op: str, impl: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """Pick the implementation to run. ``impl="auto"`` honours ``ANTIBODY_FAST_IMPL``."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: unknown impl {impl!r}; expected one of {IMPLS}")
    device = torch.device(device)
    if impl == "auto":
        impl = os.environ.get(_ENV, "auto") or "auto"
        if impl not in IMPLS:
            raise ValueError(f"{_ENV}={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        for cand in auto_order(device):
            if cand in _spec(op).impls and not not_supported_reasons(op, cand, device, dtype):
                return cand
        return "torch"
    reasons = not_supported_reasons(op, impl, device, dtype)
    if reasons:
        raise ImplUnavailableError(
            f"{op}: impl={impl!r} cannot run on {device}"
            + (f" with dtype {dtype}" if dtype is not None else "")
            + ":\n  - "
            + "\n  - ".join(reasons)
        )
    return impl


def explain(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> dict:
    """{'auto': chosen impl, 'reasons': {impl: [reasons]}} for the info report."""
    device = torch.device(device)
    spec = _spec(op)
    reasons = {i: not_supported_reasons(op, i, device, dtype) for i in spec.impls}
    chosen = next((c for c in auto_order(device) if c in spec.impls and not reasons[c]), "torch")
    return {"auto": chosen, "reasons": reasons}
