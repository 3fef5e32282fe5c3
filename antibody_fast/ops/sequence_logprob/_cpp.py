"""Binding to the C++ CPU kernels of the per-sequence log-likelihood ops (``csrc/sequence_logprob.cpp``,
``torch.ops.antibody_fast_cpp.<stage>``): the same four stages and arguments as the torch twins (``_torch.py``),
the params unpacked into the C++ schema's flat arguments."""

from ..._ext import cpp_ops
from ._torch import LinearGradParams, LinearParams, LogitsGradParams, LogitsParams


def linear_sequence_logprob_fwd(hidden, weight, bias, targets, seq_ids, p: LinearParams):
    out = cpp_ops().linear_sequence_logprob_fwd(
        hidden, weight, bias, targets, seq_ids, p.num_seqs, p.num_grad_rows, p.softcap, p.ignore_index, p.mode,
        p.row_stats,
    )  # fmt: skip
    return tuple(out)


def linear_sequence_logprob_bwd(grad, hidden, weight, bias, targets, seq_ids, lse, p: LinearGradParams):
    out = cpp_ops().linear_sequence_logprob_bwd(
        grad, hidden, weight, bias, targets, seq_ids, lse, p.num_grad_rows, p.softcap, p.ignore_index,
        p.need_dh, p.need_dw, p.need_db,
    )  # fmt: skip
    return tuple(out)


def sequence_logprob_fwd(logits, targets, seq_ids, p: LogitsParams):
    return tuple(cpp_ops().sequence_logprob_fwd(logits, targets, seq_ids, p.num_seqs, p.ignore_index))


def sequence_logprob_bwd(grad, logits, targets, seq_ids, lse, p: LogitsGradParams):
    return cpp_ops().sequence_logprob_bwd(grad, logits, targets, seq_ids, lse, p.ignore_index)
