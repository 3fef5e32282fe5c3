"""One tolerance helper for every test (xformers' ``assert_allclose`` style).

``assert_close`` checks shape and dtype first, then reports the worst element (index, actual, expected,
difference) and the fraction of elements out of tolerance. ``assert_close_to_oracle`` is the
ml-cross-entropy idiom: the kernel's error against a float64 oracle may exceed a same-dtype torch
reference's error by at most ``tol(dtype)`` elementwise.
"""

from __future__ import annotations

import torch

# Per-dtype (atol, rtol) for comparing a kernel with the float64 oracle. Never loosen to pass.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (5e-2, 1.6e-2),
}


def tol(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``."""
    return TOLERANCES[dtype]


def _describe(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, diff: torch.Tensor) -> str:
    n = bad.numel()
    nbad = int(bad.sum())
    flat_diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff).flatten()
    worst = int(flat_diff.argmax()) if flat_diff.numel() else 0
    idx = (
        tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape)) if actual.dim() else ()
    )
    a = actual.flatten()[worst].item() if n else float("nan")
    e = expected.flatten()[worst].item() if n else float("nan")
    return (
        f"{nbad}/{n} elements ({100.0 * nbad / max(n, 1):.3g}%) out of tolerance; "
        f"worst at index {idx}: actual={a!r} expected={e!r} |diff|={abs(a - e):.3g}"
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    dtype_for_tol: torch.dtype | None = None,
    check_dtype: bool = True,
    name: str = "tensor",
    equal_nan: bool = False,
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    Shapes must match exactly; dtypes too unless ``check_dtype=False``. Tolerances default to
    ``tol(dtype_for_tol or actual.dtype)``. Comparison happens in float64 on the CPU.
    """
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise AssertionError(
            f"{name}: expected tensors, got {type(actual).__name__} and {type(expected).__name__}"
        )
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape mismatch {tuple(actual.shape)} vs expected {tuple(expected.shape)}"
        )
    if check_dtype and actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype mismatch {actual.dtype} vs expected {expected.dtype}")
    d_atol, d_rtol = tol(dtype_for_tol or (actual.dtype if actual.is_floating_point() else torch.float64))
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~(diff <= bound)
    if equal_nan:
        both_nan = torch.isnan(a) & torch.isnan(e)
        bad &= ~both_nan
    # infinities: equal infinities are fine
    same_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    bad &= ~same_inf
    if bool(bad.any()):
        raise AssertionError(f"{name} (atol={atol:g}, rtol={rtol:g}): " + _describe(a, e, bad, diff))


def assert_close_to_oracle(
    actual: torch.Tensor,
    reference: torch.Tensor,
    oracle: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    name: str = "tensor",
) -> None:
    """CCE idiom: ``|oracle - actual| <= |oracle - reference| + atol + rtol*|oracle|`` elementwise.

    ``reference`` is the same-dtype torch reference, ``oracle`` the float64 result.
    """
    if actual.shape != oracle.shape or reference.shape != oracle.shape:
        raise AssertionError(
            f"{name}: shape mismatch actual={tuple(actual.shape)} ref={tuple(reference.shape)} "
            f"oracle={tuple(oracle.shape)}"
        )
    atol, rtol = tol(dtype or actual.dtype)
    a = actual.detach().to("cpu", torch.float64)
    r = reference.detach().to("cpu", torch.float64)
    o = oracle.detach().to("cpu", torch.float64)
    err = (a - o).abs()
    bound = (r - o).abs() + atol + rtol * o.abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        raise AssertionError(
            f"{name} vs float64 oracle (atol={atol:g}, rtol={rtol:g} beyond reference error): "
            + _describe(a, o, bad, err)
        )


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (or a sentinel for integer tensors) before a kernel writes it."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345)
