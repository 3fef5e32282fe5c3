"""Binding to the C++ CPU kernels of the flat-buffer ops (``csrc/flat_ops.cpp``,
``torch.ops.antibody_fast_cpp.<op>``): the same ops and arguments as the torch twins (``_torch.py``). The C++
``perturb_`` and ``clip_`` take the squared norm; without one it is computed first (C++ ``sq_norm``)."""

from __future__ import annotations

from ..._ext import cpp_ops
from ._torch import ClipParams, CombineParams, PerturbParams


def sq_norm(xs):
    return cpp_ops().sq_norm(xs)


def grad_dots(g_a, g_h, g_p):
    return cpp_ops().grad_dots(g_a, g_h, g_p)


def perturb_(theta, backup, g, sq, p: PerturbParams):
    sq = cpp_ops().sq_norm(g) if sq is None else sq.clone()
    return sq, cpp_ops().perturb_(theta, backup, g, sq, p.rho, p.eps)


def restore_(theta, backup):
    cpp_ops().restore_(theta, backup)


def antibody_combine_(out, g_a, g_h, g_p, g_r, lambda_t, lambda_ref, p: CombineParams):
    cpp_ops().antibody_combine_(
        out, g_a, g_h, g_p, g_r, lambda_t, p.lambda_t_value, lambda_ref, p.lambda_ref_value
    )


def clip_(g, sq, p: ClipParams):
    sq = cpp_ops().sq_norm(g) if sq is None else sq
    return cpp_ops().clip_(g, sq, p.max_norm)
