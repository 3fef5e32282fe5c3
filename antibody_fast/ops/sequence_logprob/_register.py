"""Registration of the per-sequence log-likelihood ops: their :class:`~antibody_fast.dispatch.OpSpec` and the
four ``torch.library`` custom ops ``torch.ops.antibody_fast.{linear_,}sequence_logprob_{fwd,bwd}`` (one
:func:`~antibody_fast.ops._registry.define_op` each: implementation table, fake kernel, autograd).

Every custom op runs ``cpp`` (``_cpp.py``), ``triton`` (``_triton.py``; on CPU tensors only under
``TRITON_INTERPRET=1``) or ``torch`` (``_torch.py``), as named by its last argument.
"""

import torch

from ...dispatch import OpSpec, register_op
from .._dtypes import acc_dtype
from .._registry import define_op, impls_named
from . import _cpp, _torch, _triton
from ._torch import LinearGradParams, LinearParams, LogitsGradParams, LogitsParams


def _extra_reasons(impl: str, device: torch.device, dtype: torch.dtype | None) -> list[str]:
    """The ops' own limits: the dtypes they take, and what the Triton kernels cannot do."""
    reasons = []
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        reasons.append(f"unsupported dtype {dtype}")
    triton = impl == "triton"
    if triton and device.type == "cpu" and dtype == torch.bfloat16:
        reasons.append(
            "the Triton interpreter computes bfloat16 arithmetic wrongly (use cpp or torch on CPU)"
        )
    if triton and dtype == torch.float64:
        reasons.append("the Triton kernels do not support float64 (use torch)")
    return reasons


# public op -> its doc line; the dispatch entry's C++ op is the op's forward stage
OPS = {
    "sequence_logprob": "per-sequence sum of log p(label) from logits",
    "linear_sequence_logprob": (
        "per-sequence sum of log p(label) fused with the lm_head matmul (also paired_sequence_logprob)"
    ),
}
for _name, _doc in OPS.items():
    register_op(
        OpSpec(
            name=_name,
            cpp_name=f"{_name}_fwd",
            triton_module="sequence_logprob",
            extra_reasons=_extra_reasons,
            doc=_doc,
        )
    )

# ------------------------------------------------------------------------------------------------------------
# custom ops: schemas (flat arguments) and fake kernels
# ------------------------------------------------------------------------------------------------------------

LINEAR_FWD_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor seq_ids, int num_seqs, "
    "int num_grad_rows, float? softcap, int ignore_index, str mode, bool row_stats, str impl) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
LINEAR_BWD_SCHEMA = (
    "(Tensor grad_logprob, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor seq_ids, "
    "Tensor lse, int num_grad_rows, float? softcap, int ignore_index, bool need_dh, bool need_dw, bool need_db, "
    "str impl) -> (Tensor, Tensor, Tensor)"
)
FWD_SCHEMA = "(Tensor logits, Tensor targets, Tensor seq_ids, int num_seqs, int ignore_index, str impl) -> (Tensor, Tensor, Tensor)"
BWD_SCHEMA = (
    "(Tensor grad_logprob, Tensor logits, Tensor targets, Tensor seq_ids, Tensor lse, int ignore_index, "
    "str impl) -> Tensor"
)


def _linear_fwd_fake(
    hidden,
    weight,
    bias,
    targets,
    seq_ids,
    num_seqs,
    num_grad_rows,
    softcap,
    ignore_index,
    mode,
    row_stats,
    impl,
):
    acc = acc_dtype(hidden.dtype)
    N, H = hidden.shape
    return (
        hidden.new_empty(num_seqs, dtype=acc),
        hidden.new_empty(num_seqs, dtype=torch.long),
        hidden.new_empty(N, dtype=acc),
        hidden.new_empty(num_grad_rows if mode == "precompute" else 0, H, dtype=acc),
        hidden.new_empty(N if row_stats else 0, dtype=acc),
        hidden.new_empty(N if row_stats else 0, dtype=torch.bool),
    )


def _linear_bwd_fake(
    grad, hidden, weight, bias, targets, seq_ids, lse, ng, softcap, ignore_index, nh, nw, nb, impl
):
    return (
        torch.empty_like(hidden) if nh else hidden.new_empty(0),
        torch.empty_like(weight) if nw else weight.new_empty(0),
        torch.empty_like(bias) if nb else hidden.new_empty(0),
    )


def _fwd_fake(logits, targets, seq_ids, num_seqs, ignore_index, impl):
    acc = acc_dtype(logits.dtype)
    return (
        logits.new_empty(num_seqs, dtype=acc),
        logits.new_empty(num_seqs, dtype=torch.long),
        logits.new_empty(logits.shape[0], dtype=acc),
    )


def _bwd_fake(grad, logits, targets, seq_ids, lse, ignore_index, impl):
    return torch.empty_like(logits)


# ------------------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------------------


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, seq_ids, num_seqs, ng, softcap, ignore_index, mode, _row_stats, impl = (
        inputs
    )
    _, num_tokens, lse, dh, entropy, top1 = output
    ctx.save_for_backward(hidden, weight, bias, targets, seq_ids, lse, dh)
    ctx.meta = (num_seqs, ng, softcap, ignore_index, mode, impl)
    # the row statistics are metrics: no gradient flows through them (docs/design.md)
    ctx.mark_non_differentiable(num_tokens, lse, dh, entropy, top1)


def _linear_backward(ctx, g_logprob, _g_num_tokens, _g_lse, _g_dh, _g_entropy, _g_top1):
    hidden, weight, bias, targets, seq_ids, lse, dh = ctx.saved_tensors
    num_seqs, ng, softcap, ignore_index, mode, impl = ctx.meta
    nh, nw, nb = (
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.needs_input_grad[2] and bias is not None,
    )
    d_h = d_w = d_b = None
    if g_logprob is not None and (nh or nw or nb):
        if mode == "precompute" and not nw and not nb:
            N, H = hidden.shape
            sid = seq_ids[:ng].clamp(0, max(num_seqs - 1, 0))
            g_rows = g_logprob.to(dh.dtype).index_select(0, sid) if num_seqs > 0 else dh.new_zeros(ng)
            d = dh * g_rows[:, None]
            if ng < N:
                d = torch.cat([d, d.new_zeros(N - ng, H)])
            d_h = d.to(hidden.dtype)
        else:
            a, b, c = linear_sequence_logprob_bwd(
                g_logprob.contiguous(), hidden, weight, bias, targets, seq_ids, lse, ng, softcap, ignore_index,
                nh, nw, nb, impl,
            )  # fmt: skip
            d_h = a if nh else None
            d_w = b if nw else None
            d_b = c if nb else None
    return d_h, d_w, d_b, None, None, None, None, None, None, None, None, None


def _setup_context(ctx, inputs, output):
    logits, targets, seq_ids, num_seqs, ignore_index, impl = inputs
    _, num_tokens, lse = output
    ctx.save_for_backward(logits, targets, seq_ids, lse)
    ctx.meta = (ignore_index, impl)
    ctx.mark_non_differentiable(num_tokens, lse)


def _backward(ctx, g_logprob, _g_num_tokens, _g_lse):
    logits, targets, seq_ids, lse = ctx.saved_tensors
    ignore_index, impl = ctx.meta
    d = None
    if g_logprob is not None and ctx.needs_input_grad[0]:
        d = sequence_logprob_bwd(g_logprob.contiguous(), logits, targets, seq_ids, lse, ignore_index, impl)
    return d, None, None, None, None, None


_IMPLS = {"cpp": _cpp, "triton": _triton, "torch": _torch}  # impl -> the module that implements it

linear_sequence_logprob_bwd = define_op(
    "linear_sequence_logprob_bwd",
    LINEAR_BWD_SCHEMA,
    impls_named("linear_sequence_logprob_bwd", _IMPLS),
    params=LinearGradParams,
    fake=_linear_bwd_fake,
)
linear_sequence_logprob_fwd = define_op(
    "linear_sequence_logprob_fwd",
    LINEAR_FWD_SCHEMA,
    impls_named("linear_sequence_logprob_fwd", _IMPLS),
    params=LinearParams,
    fake=_linear_fwd_fake,
    backward=_linear_backward,
    setup_context=_linear_setup_context,
)
sequence_logprob_bwd = define_op(
    "sequence_logprob_bwd",
    BWD_SCHEMA,
    impls_named("sequence_logprob_bwd", _IMPLS),
    params=LogitsGradParams,
    fake=_bwd_fake,
)
sequence_logprob_fwd = define_op(
    "sequence_logprob_fwd",
    FWD_SCHEMA,
    impls_named("sequence_logprob_fwd", _IMPLS),
    params=LogitsParams,
    fake=_fwd_fake,
    backward=_backward,
    setup_context=_setup_context,
)
