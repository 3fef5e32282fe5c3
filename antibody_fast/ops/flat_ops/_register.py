"""Registration of the flat-buffer ops: one :class:`~antibody_fast.dispatch.OpSpec` per public op, and one
``torch.library`` custom op each, ``torch.ops.antibody_fast.<op>`` (:func:`~antibody_fast.ops._registry.define_op`:
implementation table, fake kernel), under the op's one name: ``sq_norm``, ``grad_dots``, ``perturb_``,
``restore_``, ``antibody_combine_``, ``clip_``. The C++ kernels carry the same names under
``torch.ops.antibody_fast_cpp``, and so do the functions of ``_cpp.py``, ``_triton.py`` and ``_torch.py``.

The ops mutate their first list argument(s) in place (``Tensor(a!)[]``); ``perturb_`` and ``clip_`` compute the
squared norm themselves when ``sq_norm`` is None (Triton: fused, two launches in all for one group).
"""

from __future__ import annotations

import torch

from ...dispatch import OpSpec, register_op
from .._registry import define_op, impls_named
from . import _cpp, _torch, _triton
from ._torch import ClipParams, CombineParams, PerturbParams, sq_dtype

OPS = ("sq_norm", "grad_dots", "perturb_", "restore_", "antibody_combine_", "clip_")
for _name in OPS:
    register_op(
        OpSpec(
            name=_name,
            cpp_name=_name,
            triton_module="flat_ops",
            doc="fused op on flat parameter/gradient buffers (antibody_fast.ops.flat_ops)",
        )
    )

_IMPLS = {"cpp": _cpp, "triton": _triton, "torch": _torch}  # impl -> the module that implements it


def _sq_norm_fake(xs, impl):
    return xs[0].new_empty((), dtype=sq_dtype(xs))


def _grad_dots_fake(g_a, g_h, g_p, impl):
    return g_a[0].new_empty((3,), dtype=torch.float32)


def _perturb_fake(theta, backup, g, sq_norm, rho, eps, impl):
    sq = g[0].new_empty((), dtype=sq_dtype(g) if sq_norm is None else sq_norm.dtype)
    return sq, g[0].new_empty((), dtype=torch.bool)


def _no_output_fake(*args):
    return None


def _clip_fake(g, sq_norm, max_norm, impl):
    return g[0].new_empty((), dtype=torch.float32)


sq_norm = define_op(
    "sq_norm", "(Tensor[] xs, str impl) -> Tensor", impls_named("sq_norm", _IMPLS), fake=_sq_norm_fake
)
grad_dots = define_op(
    "grad_dots",
    "(Tensor[] g_a, Tensor[] g_h, Tensor[] g_p, str impl) -> Tensor",
    impls_named("grad_dots", _IMPLS),
    fake=_grad_dots_fake,
)
# returns (the squared norm used, the nonfinite flag)
perturb_ = define_op(
    "perturb_",
    "(Tensor(a!)[] theta, Tensor(b!)[] backup, Tensor[] g, Tensor? sq_norm, float rho, float eps, str impl) "
    "-> (Tensor, Tensor)",
    impls_named("perturb_", _IMPLS),
    params=PerturbParams,
    fake=_perturb_fake,
)
restore_ = define_op(
    "restore_",
    "(Tensor(a!)[] theta, Tensor[] backup, str impl) -> ()",
    impls_named("restore_", _IMPLS),
    fake=_no_output_fake,
)
antibody_combine_ = define_op(
    "antibody_combine_",
    "(Tensor(a!)[] out, Tensor[] g_a, Tensor[] g_h, Tensor[] g_p, Tensor[] g_r, Tensor? lambda_t, "
    "float lambda_t_value, Tensor? lambda_ref, float lambda_ref_value, str impl) -> ()",
    impls_named("antibody_combine_", _IMPLS),
    params=CombineParams,
    fake=_no_output_fake,
)
# returns the fp32 norm
clip_ = define_op(
    "clip_",
    "(Tensor(a!)[] g, Tensor? sq_norm, float max_norm, str impl) -> Tensor",
    impls_named("clip_", _IMPLS),
    params=ClipParams,
    fake=_clip_fake,
)
