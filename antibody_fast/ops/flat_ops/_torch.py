"""The pure-torch twin of the flat-buffer ops (also ``auto``'s last resort), and the out-of-place references.

Each op here takes the same arguments as its ``cpp`` and ``triton`` twins: the flat tensor lists, then one
params dataclass for the op's scalars (:class:`PerturbParams`, :class:`CombineParams`, :class:`ClipParams`).
Arithmetic is fp32 for fp16/bf16/fp32 buffers and fp64 for fp64 ones, rounded once to the storage dtype
(docs/design.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._dtypes import acc_dtype
from ._validate import FlatTensors, as_list, scalar_arg

# ----------------------------------------------------------------------------------------------------------
# the params each implementation takes (the custom ops' schemas list the same fields flat)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerturbParams:
    """Scalars of ``perturb_``: ``theta <- theta - rho * g / (||g|| + eps)``."""

    rho: float
    eps: float


@dataclass(frozen=True)
class CombineParams:
    """Scalars of ``antibody_combine_``: the lambdas when they are python floats (a lambda given as a device
    tensor travels as a tensor argument instead, and its value here is unused)."""

    lambda_t_value: float
    lambda_ref_value: float


@dataclass(frozen=True)
class ClipParams:
    """Scalars of ``clip_``: ``g *= min(1, max_norm / (||g|| + 1e-6))``."""

    max_norm: float


def sq_dtype(xs: list[torch.Tensor]) -> torch.dtype:
    """dtype of the internal squared norm: fp64 when any buffer is fp64 (keeps fp64 exact), else fp32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ----------------------------------------------------------------------------------------------------------
# the torch implementation of the custom ops
# ----------------------------------------------------------------------------------------------------------
def sq_norm(xs: list[torch.Tensor]) -> torch.Tensor:
    """0-dim squared norm in :func:`sq_dtype`."""
    out_dtype = sq_dtype(xs)
    total = None
    for x in xs:
        acc = acc_dtype(x.dtype)
        # x*x then a (cascade) sum: torch.linalg.vector_norm / torch.dot lose ~1e-4 relative at 1e6 elements
        part = x.to(acc).square().sum().to(out_dtype)
        total = part if total is None else total + part
    return total


def grad_dots(g_a: list[torch.Tensor], g_h: list[torch.Tensor], g_p: list[torch.Tensor]) -> torch.Tensor:
    """fp32 ``[<g_a, g_h - g_p>, ||g_a||^2, ||g_h - g_p||^2]``."""
    out = torch.zeros(
        3, dtype=torch.float64 if g_a[0].dtype == torch.float64 else torch.float32, device=g_a[0].device
    )
    for ga, gh, gp in zip(g_a, g_h, g_p):
        acc = acc_dtype(ga.dtype)
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


def perturb_(
    theta, backup, g, sq: torch.Tensor | None, p: PerturbParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """``backup <- theta``, then the perturbation. ``sq``: the squared norm of ``g`` (computed when None).
    Returns (the squared norm used, the nonfinite flag)."""
    sq = sq_norm(g) if sq is None else sq.clone()
    scale, ok, nonfinite = _perturb_scale(sq, p.rho, p.eps)
    for t, b, gg in zip(theta, backup, g):
        b.copy_(t)
        acc = acc_dtype(t.dtype)
        new = (t.to(acc) - scale.to(acc) * gg.to(acc)).to(t.dtype)
        # select, not multiply by 0: 0 * inf would write NaN into theta
        t.copy_(torch.where(ok, new, t))
    return sq, nonfinite


def restore_(theta, backup) -> None:
    for t, b in zip(theta, backup):
        t.copy_(b)


def antibody_combine_(out, g_a, g_h, g_p, g_r, lambda_t, lambda_ref, p: CombineParams) -> None:
    """``out <- g_a + lambda_t * (g_h - g_p) + lambda_ref * g_r`` (``g_r`` may be empty). A lambda is the 0-dim
    device tensor when given, else its value in ``p``."""
    for i, o in enumerate(out):
        acc = acc_dtype(o.dtype)
        lt = lambda_t.to(acc) if lambda_t is not None else p.lambda_t_value
        res = g_a[i].to(acc) + lt * (g_h[i].to(acc) - g_p[i].to(acc))
        if g_r:
            lr = lambda_ref.to(acc) if lambda_ref is not None else p.lambda_ref_value
            res = res + lr * g_r[i].to(acc)
        o.copy_(res.to(o.dtype))


def _clip_coef(sq: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    norm = sq.sqrt()
    return (max_norm / (norm + 1e-6)).clamp(max=1.0), norm


def clip_(g, sq: torch.Tensor | None, p: ClipParams) -> torch.Tensor:
    """Scale ``g`` in place; ``sq``: its squared norm (computed when None). Returns the fp32 norm."""
    sq = sq_norm(g) if sq is None else sq
    coef, norm = _clip_coef(sq, p.max_norm)
    for x in g:
        acc = acc_dtype(x.dtype)
        x.copy_((x.to(acc) * coef.to(acc)).to(x.dtype))
    return norm.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# references under the house naming (``<op>_reference``): same semantics, pure torch, fp32 accumulation
# ----------------------------------------------------------------------------------------------------------
def sq_norm_reference(g: FlatTensors) -> torch.Tensor:
    return sq_norm(as_list(g, "g"))


def grad_dots_reference(g_a: FlatTensors, g_h: FlatTensors, g_p: FlatTensors) -> torch.Tensor:
    return grad_dots(as_list(g_a, "g_a"), as_list(g_h, "g_h"), as_list(g_p, "g_p"))


def perturb_reference(flat: FlatTensors, g: FlatTensors, rho: float, eps: float = 1e-7) -> list[torch.Tensor]:
    """Out of place: the perturbed copies of ``flat``."""
    theta = [t.clone() for t in as_list(flat, "flat")]
    gs = as_list(g, "g")
    perturb_(theta, [torch.empty_like(t) for t in theta], gs, None, PerturbParams(rho, eps))
    return theta


def antibody_combine_reference(g_a, g_h, g_p, g_r, lambda_t, lambda_ref=0.0) -> list[torch.Tensor]:
    """Out of place combine."""
    a = as_list(g_a, "g_a")
    out = [torch.empty_like(t) for t in a]
    r = [] if g_r is None else as_list(g_r, "g_r")
    lt_t, lt_v = scalar_arg(lambda_t, "lambda_t", a[0].device)
    lr_t, lr_v = scalar_arg(lambda_ref, "lambda_ref", a[0].device)
    antibody_combine_(
        out, a, as_list(g_h, "g_h"), as_list(g_p, "g_p"), r, lt_t, lr_t, CombineParams(lt_v, lr_v)
    )
    return out


def clip_reference(g: FlatTensors, max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Out of place: (clipped copies, total norm)."""
    xs = [t.clone() for t in as_list(g, "g")]
    norm = clip_(xs, None, ClipParams(max_norm))
    return xs, norm
