"""Per-sequence log-likelihood of labelled tokens, optionally fused with the lm_head matmul.

Public API
----------
* :func:`sequence_logprob` -- from logits ``[B, T, V]`` (or packed ``[N, V]``).
* :func:`linear_sequence_logprob` -- from hidden states ``[B, T, H]`` and the lm_head weight ``[V, H]``;
  logits are never materialised beyond a bounded tile and ignored rows are dropped before any matmul.
* :func:`paired_sequence_logprob` -- completion rows (with grad) and refusal rows (never with grad) reduced in
  one launch.
* :func:`sequence_logprob_reference`, :func:`linear_sequence_logprob_reference` -- readable torch references
  that materialise the logits (the tests' oracle when run in float64; the benchmarks' "torch reference").
* :func:`linear_sequence_logprob_chunked_reference` -- a chunked pure-torch version meant for ``torch.compile``.

Row model
---------
Every input is first turned into *rows*: ``hidden [N, H]`` (or ``logits [N, V]``), ``targets [N]`` (the label
each row scores, ``ignore_index`` for none) and ``seq_ids [N]`` (the sequence each row belongs to, in
``[0, S)``).

* Padded form: ``labels [B, T]``, ``S = B``. With ``shift=True`` (the HF convention) position ``t`` scores
  ``labels[:, t + 1]`` and the last position scores nothing.
* Packed form (``seq_ids`` and ``num_seqs`` given): ``hidden [N, H]``, ``labels [N]``, ``seq_ids [N]``.
  With ``shift=True`` row ``i`` scores ``labels[i + 1]`` when row ``i + 1`` belongs to the same sequence
  (rows of one sequence must then be contiguous and in order), and nothing otherwise. With ``shift=False``
  rows are taken as already aligned (row ``i`` scores ``labels[i]``), which is what the training steps pass.

Outputs: ``SeqLogprob(logprob [S], num_tokens [S] int64)``. ``logprob`` is float32 (float64 for float64
inputs), accumulated in float32 (float64) whatever the input dtype; a sequence with no scored token gets
``logprob = 0`` and ``num_tokens = 0``; a sequence with a non-finite value on a scored row gets NaN.

Validation: ``validate=None`` checks label and seq-id ranges on the host for CPU tensors only (no sync on
CUDA). Skipped under ``torch.compile``. Without it, a label outside ``[0, V)`` still raises ``ValueError`` in
the C++ kernels, gives NaN for its sequence in the Triton kernels (never a stray read), and fails inside
torch's indexing (device-side assert on CUDA) in the torch path.

Row compaction: the C++ kernels gather the scored rows before the matmuls; the Triton kernels sort row
indices with the scored rows first (``argsort``, no host sync) and programs past the scored count exit at
once; the torch path compacts on CPU and processes every row (masked) on CUDA, where ``nonzero`` would sync.

Layers (CONTRIBUTING.md): ``torch.ops.antibody_fast.{linear_,}sequence_logprob_{fwd,bwd}`` custom ops whose CPU
kernel runs the C++ (``torch.ops.antibody_fast_cpp``), torch or (under ``TRITON_INTERPRET=1``) Triton
implementation and whose CUDA kernel runs Triton or torch; the resolved impl string is an op argument.

Gradient strategies of the fused op (``mode`` argument of the custom op):

* ``"none"``: no gradient needed (eval, refusal-only rows): forward only.
* ``"precompute"``: frozen lm_head (the LoRA case) and hidden states needing a gradient: the forward also
  computes ``dlogp/dh = ((onehot - p) * dcap) @ W`` per grad row (one extra tile matmul, stored ``[rows, H]``
  in the accumulation dtype); the backward only scales it by the per-sequence output gradient.
* ``"recompute"``: the forward stores the per-row log-sum-exp; the backward recomputes logit tiles and
  produces dH and, only when needed, dW / db. Used whenever the weight or bias needs a gradient.

For a frozen weight the choice between precompute and recompute is ``FROZEN_STRATEGY[device_type]``,
overridable with the environment variable ``ANTIBODY_FAST_FROZEN_STRATEGY=precompute|recompute``.
"""

import functools
import math
import os
from typing import NamedTuple

import torch

from ..dispatch import OpSpec, register_op, resolve_impl, triton_interpret

__all__ = [
    "SeqLogprob",
    "sequence_logprob",
    "linear_sequence_logprob",
    "paired_sequence_logprob",
    "sequence_logprob_reference",
    "linear_sequence_logprob_reference",
    "linear_sequence_logprob_chunked_reference",
    "FROZEN_STRATEGY",
]


class SeqLogprob(NamedTuple):
    """Per-sequence result. ``logprob``: ``[S]`` float32 (float64 for float64 inputs), the sum of
    ``log p(label)`` over scored positions (0 for a sequence with none). ``num_tokens``: ``[S]`` int64."""

    logprob: torch.Tensor
    num_tokens: torch.Tensor


# Frozen-lm_head strategy per device type (see module docstring).
# * CPU: precompute (2 matmuls per scored row against 3 for recompute). Measured on the 2-core development
#   CPU (N=2048 rows, 1/4 ignored, H=256, V=32000, fp32, fwd+bwd, 2 threads, C++): 0.33 s vs 0.67 s best
#   wall time (0.65 s vs 1.08 s CPU time); the matmul floor was 0.27 s, the materialised reference 1.14 s.
# * CUDA: recompute, by FLOP count (see "Frozen lm_head on CUDA" above _triton_linear_fwd): both cost
#   3 matmuls when the backward runs, precompute costs 3 instead of 1 when it does not, and holds an extra
#   [rows, H] float32 buffer between forward and backward. Not measured (no GPU has been available): switch
#   with ANTIBODY_FAST_FROZEN_STRATEGY.
FROZEN_STRATEGY = {"cpu": "precompute", "cuda": "recompute"}
_STRATEGY_ENV = "ANTIBODY_FAST_FROZEN_STRATEGY"


def _frozen_strategy(device: torch.device) -> str:
    env = os.environ.get(_STRATEGY_ENV, "")
    if env:
        if env not in ("precompute", "recompute"):
            raise ValueError(f"{_STRATEGY_ENV}={env!r}: expected 'precompute' or 'recompute'")
        return env
    return FROZEN_STRATEGY.get(device.type, "precompute")


def _extra_reasons(impl: str, device: torch.device, dtype: torch.dtype | None) -> list[str]:
    reasons = []
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        reasons.append(f"unsupported dtype {dtype}")
    if impl == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        reasons.append(
            "the Triton interpreter computes bfloat16 arithmetic wrongly (use cpp or torch on CPU)"
        )
    if impl == "triton" and dtype == torch.float64:
        reasons.append("the Triton kernels do not support float64 (use torch)")
    return reasons


register_op(
    OpSpec(
        name="sequence_logprob",
        cpp_name="sequence_logprob_fwd",
        triton_module="sequence_logprob",
        extra_reasons=_extra_reasons,
        doc="per-sequence sum of log p(label) from logits",
    )
)
register_op(
    OpSpec(
        name="linear_sequence_logprob",
        cpp_name="linear_sequence_logprob_fwd",
        triton_module="sequence_logprob",
        extra_reasons=_extra_reasons,
        doc="per-sequence sum of log p(label) fused with the lm_head matmul (also paired_sequence_logprob)",
    )
)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except Exception:  # pragma: no cover
        return False


# ------------------------------------------------------------------------------------------------------------
# input canonicalisation: rows, targets, seq ids
# ------------------------------------------------------------------------------------------------------------


def _check_labels_dtype(labels: torch.Tensor, name: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an int64 (or int32) tensor, got {labels.dtype}")


def _rows(
    labels: torch.Tensor,
    seq_ids: torch.Tensor | None,
    num_seqs: int | None,
    *,
    shift: bool,
    ignore_index: int,
    lead_shape: tuple[int, ...],
    device: torch.device,
    op: str,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(targets [N] int64, seq_ids [N] int64, S) for a padded or packed call. No host sync."""
    _check_labels_dtype(labels, f"{op}: labels")
    if labels.device != device:
        raise ValueError(f"{op}: labels are on {labels.device} but the inputs are on {device}")
    if seq_ids is None:
        if num_seqs is not None:
            raise ValueError(f"{op}: num_seqs is only meaningful with seq_ids (packed form)")
        if labels.dim() != 2 or tuple(labels.shape) != lead_shape:
            raise ValueError(
                f"{op}: padded form expects labels [B, T] matching the inputs' leading shape {lead_shape}, "
                f"got {tuple(labels.shape)}"
            )
        B, T = labels.shape
        if T == 0:
            raise ValueError(
                f"{op}: the sequences are empty (labels {tuple(labels.shape)}: T = 0 positions); every sequence "
                "needs at least one position (use the packed form with seq_ids for an empty set of rows)"
            )
        labels = labels.long()
        if shift:
            targets = torch.cat([labels[:, 1:], labels.new_full((B, 1), ignore_index)], dim=1)
        else:
            targets = labels
        targets = targets.reshape(-1)
        sids = torch.arange(B, device=device, dtype=torch.long).repeat_interleave(T)
        return targets, sids, B
    # packed form
    if num_seqs is None:
        raise ValueError(f"{op}: packed form (seq_ids given) needs num_seqs")
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 0:
        raise ValueError(f"{op}: num_seqs must be a non-negative int, got {num_seqs!r}")
    _check_labels_dtype(seq_ids, f"{op}: seq_ids")
    if seq_ids.device != device:
        raise ValueError(f"{op}: seq_ids are on {seq_ids.device} but the inputs are on {device}")
    if labels.dim() != 1 or tuple(labels.shape) != lead_shape:
        raise ValueError(
            f"{op}: packed form expects labels [N] matching the inputs' rows {lead_shape}, got {tuple(labels.shape)}"
        )
    if tuple(seq_ids.shape) != tuple(labels.shape):
        raise ValueError(
            f"{op}: seq_ids {tuple(seq_ids.shape)} must have the shape of labels {tuple(labels.shape)}"
        )
    labels = labels.long()
    sids = seq_ids.long()
    if shift:
        n = labels.shape[0]
        nxt = torch.cat([labels[1:], labels.new_full((min(n, 1),), ignore_index)])
        same = torch.cat([sids[1:] == sids[:-1], torch.zeros(min(n, 1), dtype=torch.bool, device=device)])
        targets = torch.where(same, nxt, torch.full_like(nxt, ignore_index))
    else:
        targets = labels
    return targets.contiguous(), sids.contiguous(), num_seqs


def _validate_rows(
    targets: torch.Tensor, sids: torch.Tensor, S: int, V: int, ignore_index: int, op: str
) -> None:
    """Host-syncing checks (run when ``validate`` is on: by default for CPU tensors)."""
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: label {int(targets[i])} (row {i}) is outside [0, {V}) and is not ignore_index={ignore_index}"
        )
    if bool(((sids < 0) | (sids >= S)).any()):
        raise ValueError(f"{op}: seq_ids must lie in [0, num_seqs={S})")


def _want_validate(validate: bool | None, device: torch.device) -> bool:
    if _is_compiling():
        return False  # data-dependent checks would break the graph; run them eagerly if needed
    return device.type == "cpu" if validate is None else bool(validate)


def _check_float(t: torch.Tensor, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")


# ------------------------------------------------------------------------------------------------------------
# torch implementation of the custom ops (chunked; also the CUDA last resort)
# ------------------------------------------------------------------------------------------------------------

_TORCH_CHUNK_ELEMS = 1 << 23  # logits elements per chunk (32 MiB in fp32)


def _chunk_rows(V: int) -> int:
    return max(16, min(4096, _TORCH_CHUNK_ELEMS // max(V, 1)))


def _compact(device: torch.device) -> bool:
    """Whether the torch path compacts the scored rows (nonzero: a host sync, free on CPU only)."""
    return device.type == "cpu"


def _scored_rows(valid: torch.Tensor) -> torch.Tensor:
    # On CPU compaction costs nothing; on CUDA nonzero would sync, so process every row (masked).
    if _compact(valid.device):
        return valid.nonzero().squeeze(1)
    return torch.arange(valid.shape[0], device=valid.device)


def _torch_linear_fwd(hidden, weight, bias, targets, seq_ids, S, ng, softcap, ignore_index, mode):
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    logprob = torch.zeros(S, dtype=acc, device=dev)
    num_tokens = torch.zeros(S, dtype=torch.long, device=dev)
    lse = torch.zeros(N, dtype=acc, device=dev)
    dh = torch.zeros(ng if mode == "precompute" else 0, H, dtype=acc, device=dev)
    valid = targets != ignore_index
    num_tokens.index_add_(0, seq_ids, valid.long())
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    _chunk_start = [0]  # first row of the current chunk when rows are not compacted (CUDA)
    for rows in _scored_rows(valid).split(_chunk_rows(V)):
        h = hidden.index_select(0, rows).to(acc)
        z = h @ w.t()
        if b is not None:
            z = z + b
        if softcap is not None:
            t = torch.tanh(z / softcap)
            z = softcap * t
        m = z.amax(1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        row_lse = (z - m).exp().sum(1).log() + m.squeeze(1)
        ok = valid.index_select(0, rows)
        tgt = torch.where(ok, targets.index_select(0, rows), 0)
        lp = z.gather(1, tgt[:, None]).squeeze(1) - row_lse
        lp = torch.where(torch.isfinite(lp), lp, torch.full_like(lp, float("nan")))
        lp = torch.where(ok, lp, torch.zeros_like(lp))
        lse.index_copy_(0, rows, row_lse)
        logprob.index_add_(0, seq_ids.index_select(0, rows), lp)
        if mode == "precompute":
            g = rows < ng
            dz = -(z - row_lse[:, None]).exp()
            dz.scatter_add_(1, tgt[:, None], torch.ones_like(dz[:, :1]))
            if softcap is not None:
                dz = dz * (1 - t * t)
            dz = dz * (ok & g)[:, None].to(acc)
            d = dz @ w
            if _compact(dev):
                sel = g.nonzero().squeeze(1)
                dh.index_copy_(0, rows.index_select(0, sel), d.index_select(0, sel))
            else:  # rows is a contiguous arange chunk here (no compaction on CUDA)
                start = int(_chunk_start[0])
                stop = min(start + d.shape[0], ng)
                if stop > start:
                    dh[start:stop] = d[: stop - start]
        _chunk_start[0] += rows.shape[0]
    return logprob, num_tokens, lse, dh


def _torch_linear_bwd(
    grad, hidden, weight, bias, targets, seq_ids, lse, ng, softcap, ignore_index, nh, nw, nb
):
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    dh = torch.zeros(N, H, dtype=acc, device=dev) if nh else None
    dw = torch.zeros(V, H, dtype=acc, device=dev) if nw else None
    db = torch.zeros(V, dtype=acc, device=dev) if nb else None
    valid = (targets != ignore_index) & (torch.arange(N, device=dev) < ng)
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    g_all = grad.to(acc)
    for rows in _scored_rows(valid).split(_chunk_rows(V)):
        h = hidden.index_select(0, rows).to(acc)
        z = h @ w.t()
        if b is not None:
            z = z + b
        if softcap is not None:
            t = torch.tanh(z / softcap)
            z = softcap * t
        ok = valid.index_select(0, rows)
        tgt = torch.where(ok, targets.index_select(0, rows), 0)
        dz = -(z - lse.index_select(0, rows)[:, None]).exp()
        dz.scatter_add_(1, tgt[:, None], torch.ones_like(dz[:, :1]))
        if softcap is not None:
            dz = dz * (1 - t * t)
        gs = g_all.index_select(0, seq_ids.index_select(0, rows))
        dz = dz * torch.where(ok, gs, torch.zeros_like(gs))[:, None]
        if nh:
            dh.index_add_(0, rows, dz @ w)
        if nw:
            dw.addmm_(dz.t(), h)
        if nb:
            db.add_(dz.sum(0))
    return (  # distinct empty tensors: custom-op outputs must not alias each other
        dh.to(hidden.dtype) if nh else hidden.new_empty(0),
        dw.to(weight.dtype) if nw else weight.new_empty(0),
        db.to(bias.dtype) if nb else hidden.new_empty(0),
    )


def _torch_fwd(logits, targets, seq_ids, S, ignore_index):
    N, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    dev = logits.device
    logprob = torch.zeros(S, dtype=acc, device=dev)
    num_tokens = torch.zeros(S, dtype=torch.long, device=dev)
    lse = torch.zeros(N, dtype=acc, device=dev)
    valid = targets != ignore_index
    num_tokens.index_add_(0, seq_ids, valid.long())
    for rows in _scored_rows(valid).split(_chunk_rows(V)):
        z = logits.index_select(0, rows).to(acc)
        row_lse = torch.logsumexp(z, 1)
        ok = valid.index_select(0, rows)
        tgt = torch.where(ok, targets.index_select(0, rows), 0)
        lp = z.gather(1, tgt[:, None]).squeeze(1) - row_lse
        lp = torch.where(torch.isfinite(lp), lp, torch.full_like(lp, float("nan")))
        lp = torch.where(ok, lp, torch.zeros_like(lp))
        lse.index_copy_(0, rows, row_lse)
        logprob.index_add_(0, seq_ids.index_select(0, rows), lp)
    return logprob, num_tokens, lse


def _torch_bwd(grad, logits, targets, seq_ids, lse, ignore_index):
    N, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    out = torch.zeros(N, V, dtype=logits.dtype, device=logits.device)
    valid = targets != ignore_index
    g_all = grad.to(acc)
    for rows in _scored_rows(valid).split(_chunk_rows(V)):
        z = logits.index_select(0, rows).to(acc)
        ok = valid.index_select(0, rows)
        tgt = torch.where(ok, targets.index_select(0, rows), 0)
        dz = -(z - lse.index_select(0, rows)[:, None]).exp()
        dz.scatter_add_(1, tgt[:, None], torch.ones_like(dz[:, :1]))
        gs = g_all.index_select(0, seq_ids.index_select(0, rows))
        dz = dz * torch.where(ok, gs, torch.zeros_like(gs))[:, None]
        out.index_copy_(0, rows, dz.to(logits.dtype))
    return out


# ------------------------------------------------------------------------------------------------------------
# custom ops
# ------------------------------------------------------------------------------------------------------------


def _cpp():
    from .._ext import cpp_ops

    return cpp_ops()


def _kernels():
    from ..kernels import sequence_logprob as k  # lazy: TRITON_INTERPRET must be set before definition

    return k


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------------------------------
# Triton schedule of the fused lm_head op (GPU-shaped; kernels: kernels/sequence_logprob.py)
# ------------------------------------------------------------------------------------------------------------
#
# Notation: N scored rows, V vocabulary, H hidden size; one "matmul" = 2*N*V*H FLOPs.
#
# Forward (2 launches): ``_linear_fwd_kernel`` on a 2-D grid (row tiles x vocabulary chunks) writes per-chunk
#   (max, sum-exp) partials ``[n_chunks, N]`` and the label logit; ``_lse_combine_kernel`` merges them into
#   LSE and log p. The chunk width is picked so that the grid has at least 4 programs per SM
#   (``_fwd_chunk``): at N = 4096, BLOCK_M = 128 that is 32 row tiles x 18 chunks = 576 programs on a
#   132-SM H100 (V = 32000: 1792-wide chunks; V = 128256: 7424-wide). Programs are ordered row tile first,
#   so the programs in flight share a vocabulary chunk and W is read from HBM about once.
#   1 matmul.
# Backward, per vocabulary chunk ``[v_lo, v_hi)`` (3 launches each): ``_linear_dz_kernel`` recomputes the
#   logit tile and stores dz = g * (onehot - p) * dcap into a bounded buffer ``[rows, chunk]`` (input dtype;
#   at most _DZ_BUDGET bytes, so logits are never materialised whole); ``_linear_dh_kernel`` adds
#   dz @ W[chunk] into dH, each program owning a (row tile, hidden tile); ``_linear_dw_kernel`` computes
#   dW[chunk] = dz^T @ H, each program owning a (vocabulary tile, hidden tile) of dW and looping over every
#   scored row (plus db). dW is therefore written exactly once per element, in the weight's dtype, with no
#   atomics and no split-K buffer: the row loop is the reduction. Chosen over split-K because the chunked dz
#   buffer already gives every dW tile its whole reduction, and the grid is wide enough without splitting
#   (V = 32000, H = 4096, 128 x 128 tiles: 8000 programs). 1 matmul (recompute) + 1 (dH) + 1 (dW, when the
#   weight trains).
# Autotuning (CUDA only): each kernel is wrapped in ``triton.autotune`` over the few configurations of
#   ``LINEAR_CONFIGS`` (keyed on the sizes and dtypes); the dH kernel's accumulator is restored between trial
#   runs. Under the interpreter (``TRITON_INTERPRET=1``) one fixed small configuration runs, and the chunks
#   are narrow (_INTERP_CHUNK) so that the tests cross chunk boundaries.
#
# Frozen lm_head on CUDA (FROZEN_STRATEGY["cuda"] = "recompute"), by FLOP count. The 2-D forward splits each
#   row over vocabulary chunks, so p = exp(z - LSE) is known only after the combine: a precomputed dH needs
#   a second pass over the logits in the forward (dz + dH kernels, the same as the backward). Precompute:
#   forward 1 + 2 = 3 matmuls, backward 0 (a scale of the stored [N, H] float32 dH). Recompute: forward 1,
#   backward 2. Equal totals (3 matmuls), so recompute wins on everything else: a forward without a backward
#   (evaluation with grad enabled, a refusal-only call) costs 1 matmul instead of 3, and no [N, H] float32
#   buffer lives from the forward to the backward. (On CPU the C++ kernel sees whole rows per block, so its
#   precompute costs 2 matmuls against 3 and wins: see FROZEN_STRATEGY's comment.)

# One configuration: (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages). The roles of the blocks:
#   fwd, dz: BLOCK_M rows x BLOCK_V vocabulary outputs, reduction over H in BLOCK_K steps;
#   dh:      BLOCK_M rows x BLOCK_K hidden outputs, reduction over the chunk in BLOCK_V steps;
#   dw:      BLOCK_V vocabulary x BLOCK_K hidden outputs, reduction over the rows in BLOCK_M steps.
# "tc": float16 / bfloat16 on CUDA (tensor cores, float32 accumulation); "f32": float32 on CUDA (IEEE fp32
# dots: no TF32); "interp": the interpreter (fp32 dots, smallest legal tiles).
LINEAR_CONFIGS = {
    "fwd": {
        "tc": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3)],
        "f32": [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)],
        "interp": [(16, 32, 16, 4, 1)],
    },
    "dz": {
        "tc": [(128, 128, 64, 8, 3), (64, 128, 64, 8, 4), (128, 64, 64, 4, 3)],
        "f32": [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)],
        "interp": [(16, 32, 16, 4, 1)],
    },
    "dh": {
        "tc": [(128, 64, 128, 8, 3), (64, 64, 128, 4, 4), (64, 64, 256, 8, 3)],
        "f32": [(32, 32, 64, 4, 3), (64, 32, 64, 4, 2)],
        "interp": [(16, 16, 32, 4, 1)],
    },
    "dw": {
        "tc": [(64, 128, 128, 8, 3), (64, 64, 128, 4, 4), (64, 64, 256, 8, 3)],
        "f32": [(32, 64, 32, 8, 2), (32, 32, 32, 4, 2)],
        "interp": [(16, 32, 16, 4, 1)],
    },
}
_LINEAR_KERNELS = {
    "fwd": "_linear_fwd_kernel",
    "dz": "_linear_dz_kernel",
    "dh": "_linear_dh_kernel",
    "dw": "_linear_dw_kernel",
}
_AUTOTUNE_KEYS = {
    "fwd": ["K", "V", "v_chunk"],
    "dz": ["K", "stride_dz"],
    "dh": ["K", "stride_dz"],
    "dw": ["K", "stride_dz"],
}
_COMBINE_BLOCKS = {"cuda": (64, 32, 4), "cpu": (16, 4, 4)}  # (BLOCK_R, BLOCK_C, num_warps)
_INTERP_CHUNK = 64  # vocabulary columns per chunk under the interpreter (tests use V = 100: 2 chunks)
_DZ_BUDGET = 256 << 20  # bytes of the backward's dz buffer on CUDA
_PROGRAMS_PER_SM = 4  # forward grid target


def _config_kind(dtype: torch.dtype, device: torch.device) -> str:
    if device.type == "cpu":
        return "interp"
    return "f32" if dtype == torch.float32 else "tc"


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _autotuned(stage: str, kind: str):
    """The ``triton.autotune`` wrapper of one lm_head kernel over ``LINEAR_CONFIGS[stage][kind]`` (CUDA)."""
    import triton

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bm, bv, bk, w, st in LINEAR_CONFIGS[stage][kind]
    ]
    extra = {"restore_value": ["DH_ptr"]} if stage == "dh" else {}
    kernel = getattr(_kernels(), _LINEAR_KERNELS[stage])
    return triton.autotune(configs=configs, key=_AUTOTUNE_KEYS[stage], **extra)(kernel)


def _launch(stage: str, kind: str, grid, *args, **flags) -> None:
    """Launch an lm_head kernel: autotuned on CUDA, the fixed interpreter config on CPU. ``grid(meta)`` gets
    the chosen blocks (``meta["BLOCK_M"]`` ...)."""
    if kind == "interp":
        bm, bv, bk, w, st = LINEAR_CONFIGS[stage][kind][0]
        meta = {"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}
        kernel = getattr(_kernels(), _LINEAR_KERNELS[stage])
        kernel[grid(meta)](*args, **flags, **meta, num_warps=w, num_stages=st)
    else:
        _autotuned(stage, kind)[grid](*args, **flags)


def _round_down(x: int, m: int) -> int:
    return max(m, (x // m) * m)


def _fwd_chunk(N: int, V: int, device: torch.device) -> int:
    """Vocabulary columns per forward program: enough chunks for _PROGRAMS_PER_SM programs per SM with the
    largest row tile (a multiple of 256, the widest BLOCK_V); _INTERP_CHUNK under the interpreter."""
    if device.type == "cpu":
        return _INTERP_CHUNK
    row_tiles = _cdiv(N, max(c[0] for c in LINEAR_CONFIGS["fwd"]["tc"] + LINEAR_CONFIGS["fwd"]["f32"]))
    want = _cdiv(_PROGRAMS_PER_SM * _sm_count(device), max(row_tiles, 1))
    return _round_down(_cdiv(V, want), 256)


def _bwd_chunk(rows: int, V: int, elt: int, device: torch.device) -> int:
    """Vocabulary columns per backward chunk: the dz buffer ``[rows, chunk]`` stays within _DZ_BUDGET."""
    if device.type == "cpu":
        return _INTERP_CHUNK
    return min(_round_down(_DZ_BUDGET // max(rows * elt, 1), 256), _cdiv(V, 256) * 256)


def _sorted_rows(sel: torch.Tensor, grad_first: torch.Tensor | None = None):
    """(perm [N] int64 with the selected rows first (grad rows first among them), count [1] int32), no sync."""
    key = (~sel).to(torch.int8) * 2
    if grad_first is not None:
        key = key + (sel & ~grad_first).to(torch.int8)
    perm = torch.argsort(key, stable=True)
    return perm, sel.sum().to(torch.int32).reshape(1)


def _triton_linear_grads(
    hidden, weight, bias, targets, seq_ids, lse, g, perm, n_sel, rows, softcap, dh, dw, db
):
    """Chunked backward: for each vocabulary chunk, dz (bounded buffer), then dH += dz @ W[chunk] into ``dh``
    (float32, indexed by row), dW[chunk] = dz^T @ H into ``dw`` (weight dtype) and db[chunk] into ``db``
    (float32); ``dw`` / ``db`` may be None. ``rows``: an upper bound of the selected count (grid size)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    kind = _config_kind(hidden.dtype, dev)
    dot_f32 = kind != "tc"
    dz_dtype = torch.float32 if dot_f32 else hidden.dtype
    chunk = _bwd_chunk(rows, V, torch.finfo(dz_dtype).bits // 8, dev)
    dz = torch.empty(rows, chunk, dtype=dz_dtype, device=dev)
    b_arg = bias if bias is not None else hidden
    sc = float(softcap) if softcap is not None else 1.0
    need_dw, need_db = dw is not None, db is not None
    dw_arg = dw if need_dw else dz
    db_arg = db if need_db else lse
    for v_lo in range(0, V, chunk):
        v_hi = min(v_lo + chunk, V)
        width = v_hi - v_lo
        _launch(
            "dz", kind, lambda m, w=width: (_cdiv(rows, m["BLOCK_M"]), _cdiv(w, m["BLOCK_V"])),
            hidden, weight, b_arg, targets, seq_ids, perm, n_sel, lse, g, dz, H, v_lo, v_hi,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0), sc,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, DOT_F32=dot_f32,
        )  # fmt: skip
        if dh is not None:
            _launch(
                "dh", kind, lambda m: (_cdiv(rows, m["BLOCK_M"]), _cdiv(H, m["BLOCK_K"])),
                dz, weight, perm, n_sel, dh, H, v_lo, v_hi, dz.stride(0), weight.stride(0), weight.stride(1),
                dh.stride(0), DOT_F32=dot_f32,
            )  # fmt: skip
        if need_dw or need_db:
            _launch(
                "dw", kind, lambda m, w=width: (_cdiv(w, m["BLOCK_V"]), _cdiv(H, m["BLOCK_K"]) if need_dw else 1),
                dz, hidden, perm, n_sel, dw_arg, db_arg, H, v_lo, v_hi, dz.stride(0), hidden.stride(0),
                hidden.stride(1), dw.stride(0) if need_dw else 0, NEED_DW=need_dw, NEED_DB=need_db,
                DOT_F32=dot_f32,
            )  # fmt: skip


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a copy when its data pointer is not 16-byte aligned (a view with an offset): the kernels
    are compiled and checked for aligned operands (antibody_fast/gpu_compile.py). No host sync."""
    if t is None or t.device.type == "cpu" or t.data_ptr() % 16 == 0:
        return t
    return t.clone()


def _triton_linear_fwd(hidden, weight, bias, targets, seq_ids, S, ng, softcap, ignore_index, mode):
    hidden, weight, bias = _aligned(hidden), _aligned(weight), _aligned(bias)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    logprob = torch.zeros(S, dtype=f32, device=dev)
    lse = torch.zeros(N, dtype=f32, device=dev)
    dh = torch.zeros(ng if mode == "precompute" else 0, H, dtype=f32, device=dev)
    valid = targets != ignore_index
    num_tokens = torch.zeros(S, dtype=torch.long, device=dev).index_add_(0, seq_ids, valid.long())
    if N == 0 or V == 0:
        return logprob, num_tokens, lse, dh
    k = _kernels()
    grad_row = torch.arange(N, device=dev) < ng
    perm, n_valid = _sorted_rows(valid, grad_row)
    kind = _config_kind(hidden.dtype, dev)
    chunk = _fwd_chunk(N, V, dev)
    n_chunks = _cdiv(V, chunk)
    n_pad = _cdiv(N, 16) * 16  # partial rows padded: the stride stays divisible by 16 (one specialization)
    part_m = torch.empty(n_chunks, n_pad, dtype=f32, device=dev)
    part_l = torch.empty(n_chunks, n_pad, dtype=f32, device=dev)
    z_t = torch.empty(N, dtype=f32, device=dev)
    b_arg = bias if bias is not None else hidden
    sc = float(softcap) if softcap is not None else 1.0
    _launch(
        "fwd", kind, lambda m: (_cdiv(N, m["BLOCK_M"]), n_chunks),
        hidden, weight, b_arg, targets, perm, n_valid, part_m, part_l, z_t, H, V, chunk,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), part_m.stride(0), sc,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, DOT_F32=kind != "tc",
    )  # fmt: skip
    BR, BC, warps = _COMBINE_BLOCKS["cpu" if dev.type == "cpu" else "cuda"]
    k._lse_combine_kernel[(_cdiv(N, BR),)](
        part_m, part_l, z_t, targets, seq_ids, perm, n_valid, lse, logprob, n_chunks, part_m.stride(0), V,
        BLOCK_R=BR, BLOCK_C=BC, num_warps=warps,
    )  # fmt: skip
    if mode == "precompute" and ng > 0:
        # dlogp/dh of every grad row: the backward's dz / dH pass with g = 1 (see the schedule notes above)
        n_grad = (valid & grad_row).sum().to(torch.int32).reshape(1)
        ones = torch.ones(max(S, 1), dtype=f32, device=dev)
        _triton_linear_grads(
            hidden, weight, bias, targets, seq_ids, lse, ones, perm, n_grad, ng, softcap, dh, None, None
        )
    return logprob, num_tokens, lse, dh


def _triton_linear_bwd(
    grad, hidden, weight, bias, targets, seq_ids, lse, ng, softcap, ignore_index, nh, nw, nb
):
    hidden, weight, bias = _aligned(hidden), _aligned(weight), _aligned(bias)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    nb = nb and bias is not None
    dh = torch.zeros(N if nh else 0, H, dtype=f32, device=dev)
    live = N > 0 and V > 0 and ng > 0 and (nh or nw or nb)
    # dW is written once per element by the kernels (weight dtype); zeros when nothing runs
    dw = (torch.empty if live else torch.zeros)(V if nw else 0, H, dtype=weight.dtype, device=dev)
    db = torch.zeros(V if nb else 0, dtype=f32, device=dev)
    if live:
        sel = (targets != ignore_index) & (torch.arange(N, device=dev) < ng)
        perm, n_sel = _sorted_rows(sel)
        g = grad.to(f32).contiguous()
        _triton_linear_grads(
            hidden, weight, bias, targets, seq_ids, lse, g, perm, n_sel, ng, softcap,
            dh if nh else None, dw if nw else None, db if nb else None,
        )  # fmt: skip
    return (  # distinct empty tensors: custom-op outputs must not alias each other
        dh.to(hidden.dtype) if nh else hidden.new_empty(0),
        dw if nw else weight.new_empty(0),
        db.to(bias.dtype) if nb else hidden.new_empty(0),
    )


def _logits_block(device: torch.device) -> tuple[int, int]:
    return (64, 4) if device.type == "cpu" else (1024, 8)


def _triton_fwd(logits, targets, seq_ids, S, ignore_index):
    N, V = logits.shape
    dev = logits.device
    logprob = torch.zeros(S, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    valid = targets != ignore_index
    num_tokens = torch.zeros(S, dtype=torch.long, device=dev).index_add_(0, seq_ids, valid.long())
    if N > 0 and V > 0:
        BV, warps = _logits_block(dev)
        _kernels()._fwd_kernel[(N,)](
            logits, targets, seq_ids, lse, logprob, V, logits.stride(0), logits.stride(1), ignore_index,
            BLOCK_V=BV, num_warps=warps,
        )  # fmt: skip
    return logprob, num_tokens, lse


def _triton_bwd(grad, logits, targets, seq_ids, lse, ignore_index):
    N, V = logits.shape
    out = torch.zeros(N, V, dtype=logits.dtype, device=logits.device)
    if N > 0 and V > 0:
        BV, warps = _logits_block(logits.device)
        _kernels()._bwd_kernel[(N, _cdiv(V, BV))](
            grad.to(torch.float32).contiguous(), logits, targets, seq_ids, lse, out, V, logits.stride(0),
            logits.stride(1), out.stride(0), ignore_index, BLOCK_V=BV, num_warps=warps,
        )  # fmt: skip
    return out


def _check_triton_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not triton_interpret():
        raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1")


_LINEAR_FWD_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor seq_ids, int num_seqs, "
    "int num_grad_rows, float? softcap, int ignore_index, str mode, str impl) -> (Tensor, Tensor, Tensor, Tensor)"
)
_LINEAR_BWD_SCHEMA = (
    "(Tensor grad_logprob, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor seq_ids, "
    "Tensor lse, int num_grad_rows, float? softcap, int ignore_index, bool need_dh, bool need_dw, bool need_db, "
    "str impl) -> (Tensor, Tensor, Tensor)"
)
_FWD_SCHEMA = "(Tensor logits, Tensor targets, Tensor seq_ids, int num_seqs, int ignore_index, str impl) -> (Tensor, Tensor, Tensor)"
_BWD_SCHEMA = (
    "(Tensor grad_logprob, Tensor logits, Tensor targets, Tensor seq_ids, Tensor lse, int ignore_index, "
    "str impl) -> Tensor"
)


def _linear_fwd_kernel(
    hidden, weight, bias, targets, seq_ids, num_seqs, num_grad_rows, softcap, ignore_index, mode, impl
):
    if impl == "cpp":
        return tuple(
            _cpp().linear_sequence_logprob_fwd(
                hidden, weight, bias, targets, seq_ids, num_seqs, num_grad_rows, softcap, ignore_index, mode
            )
        )
    if impl == "triton":
        _check_triton_device(hidden)
        return _triton_linear_fwd(
            hidden, weight, bias, targets, seq_ids, num_seqs, num_grad_rows, softcap, ignore_index, mode
        )
    return _torch_linear_fwd(
        hidden, weight, bias, targets, seq_ids, num_seqs, num_grad_rows, softcap, ignore_index, mode
    )


def _linear_bwd_kernel(
    grad, hidden, weight, bias, targets, seq_ids, lse, ng, softcap, ignore_index, nh, nw, nb, impl
):
    if impl == "cpp":
        return tuple(
            _cpp().linear_sequence_logprob_bwd(
                grad, hidden, weight, bias, targets, seq_ids, lse, ng, softcap, ignore_index, nh, nw, nb
            )
        )
    if impl == "triton":
        _check_triton_device(hidden)
        return _triton_linear_bwd(
            grad, hidden, weight, bias, targets, seq_ids, lse, ng, softcap, ignore_index, nh, nw, nb
        )
    return _torch_linear_bwd(
        grad, hidden, weight, bias, targets, seq_ids, lse, ng, softcap, ignore_index, nh, nw, nb
    )


def _fwd_kernel(logits, targets, seq_ids, num_seqs, ignore_index, impl):
    if impl == "cpp":
        return tuple(_cpp().sequence_logprob_fwd(logits, targets, seq_ids, num_seqs, ignore_index))
    if impl == "triton":
        _check_triton_device(logits)
        return _triton_fwd(logits, targets, seq_ids, num_seqs, ignore_index)
    return _torch_fwd(logits, targets, seq_ids, num_seqs, ignore_index)


def _bwd_kernel(grad, logits, targets, seq_ids, lse, ignore_index, impl):
    if impl == "cpp":
        return _cpp().sequence_logprob_bwd(grad, logits, targets, seq_ids, lse, ignore_index)
    if impl == "triton":
        _check_triton_device(logits)
        return _triton_bwd(grad, logits, targets, seq_ids, lse, ignore_index)
    return _torch_bwd(grad, logits, targets, seq_ids, lse, ignore_index)


def _custom_op(name: str, fn, schema: str):
    """A functional (non-mutating) ``antibody_fast::<name>`` custom op with CPU and CUDA kernels ``fn``."""
    return torch.library.custom_op(
        f"antibody_fast::{name}", fn, mutates_args=(), device_types=("cpu", "cuda"), schema=schema
    )


_linear_fwd_op = _custom_op("linear_sequence_logprob_fwd", _linear_fwd_kernel, _LINEAR_FWD_SCHEMA)
_linear_bwd_op = _custom_op("linear_sequence_logprob_bwd", _linear_bwd_kernel, _LINEAR_BWD_SCHEMA)
_fwd_op = _custom_op("sequence_logprob_fwd", _fwd_kernel, _FWD_SCHEMA)
_bwd_op = _custom_op("sequence_logprob_bwd", _bwd_kernel, _BWD_SCHEMA)


@_linear_fwd_op.register_fake
def _(hidden, weight, bias, targets, seq_ids, num_seqs, num_grad_rows, softcap, ignore_index, mode, impl):
    acc = _acc_dtype(hidden.dtype)
    N, H = hidden.shape
    return (
        hidden.new_empty(num_seqs, dtype=acc),
        hidden.new_empty(num_seqs, dtype=torch.long),
        hidden.new_empty(N, dtype=acc),
        hidden.new_empty(num_grad_rows if mode == "precompute" else 0, H, dtype=acc),
    )


@_linear_bwd_op.register_fake
def _(grad, hidden, weight, bias, targets, seq_ids, lse, ng, softcap, ignore_index, nh, nw, nb, impl):
    return (
        torch.empty_like(hidden) if nh else hidden.new_empty(0),
        torch.empty_like(weight) if nw else weight.new_empty(0),
        torch.empty_like(bias) if nb else hidden.new_empty(0),
    )


@_fwd_op.register_fake
def _(logits, targets, seq_ids, num_seqs, ignore_index, impl):
    acc = _acc_dtype(logits.dtype)
    return (
        logits.new_empty(num_seqs, dtype=acc),
        logits.new_empty(num_seqs, dtype=torch.long),
        logits.new_empty(logits.shape[0], dtype=acc),
    )


@_bwd_op.register_fake
def _(grad, logits, targets, seq_ids, lse, ignore_index, impl):
    return torch.empty_like(logits)


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, seq_ids, num_seqs, ng, softcap, ignore_index, mode, impl = inputs
    _, num_tokens, lse, dh = output
    ctx.save_for_backward(hidden, weight, bias, targets, seq_ids, lse, dh)
    ctx.meta = (num_seqs, ng, softcap, ignore_index, mode, impl)
    ctx.mark_non_differentiable(num_tokens, lse, dh)


def _linear_backward(ctx, g_logprob, _g_num_tokens, _g_lse, _g_dh):
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
            a, b, c = _linear_bwd_op(
                g_logprob.contiguous(), hidden, weight, bias, targets, seq_ids, lse, ng, softcap, ignore_index,
                nh, nw, nb, impl,
            )  # fmt: skip
            d_h = a if nh else None
            d_w = b if nw else None
            d_b = c if nb else None
    return d_h, d_w, d_b, None, None, None, None, None, None, None, None


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
        d = _bwd_op(g_logprob.contiguous(), logits, targets, seq_ids, lse, ignore_index, impl)
    return d, None, None, None, None, None


_linear_fwd_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)
_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------


def _check_softcap(softcap, op):
    if softcap is None:
        return None
    if (
        isinstance(softcap, bool)
        or not isinstance(softcap, (int, float))
        or not softcap > 0
        or not math.isfinite(softcap)
    ):
        raise ValueError(f"{op}: softcap must be a finite positive float or None, got {softcap!r}")
    return float(softcap)


def _check_head(hidden, weight, bias, op):
    _check_float(hidden, "hidden", op)
    _check_float(weight, "weight", op)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden size {hidden.shape[-1]} does not match weight [V, H] = {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden is {hidden.dtype} but weight is {weight.dtype}; they must match")
    if hidden.device != weight.device:
        raise ValueError(f"{op}: hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        _check_float(bias, "bias", op)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(
                f"{op}: bias ({bias.dtype}, {bias.device}) must match weight ({weight.dtype}, {weight.device})"
            )


def _flatten_hidden(hidden, seq_ids, op):
    if seq_ids is None:
        if hidden.dim() != 3:
            raise ValueError(f"{op}: padded form expects hidden [B, T, H], got shape {tuple(hidden.shape)}")
        return hidden.reshape(-1, hidden.shape[-1]), tuple(hidden.shape[:2])
    if hidden.dim() != 2:
        raise ValueError(f"{op}: packed form expects hidden [N, H], got shape {tuple(hidden.shape)}")
    return hidden, (hidden.shape[0],)


def _grad_mode(hidden, weight, bias) -> tuple[bool, bool]:
    """(needs any grad, needs weight/bias grad)."""
    if not torch.is_grad_enabled():
        return False, False
    wb = weight.requires_grad or (bias is not None and bias.requires_grad)
    return hidden.requires_grad or wb, wb


def _out(logprob, num_tokens) -> SeqLogprob:
    return SeqLogprob(logprob, num_tokens)


def sequence_logprob(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    impl: str = "auto",
    validate: bool | None = None,
) -> SeqLogprob:
    """Per-sequence sum of ``log softmax(logits)[label]`` over the scored positions.

    Args:
        logits: ``[B, T, V]`` (padded) or ``[N, V]`` (packed), float16 / bfloat16 / float32 / float64.
            Differentiable.
        labels: ``[B, T]`` or ``[N]`` int64; ``ignore_index`` marks unscored positions.
        shift: HF convention: position ``t`` scores ``labels[t + 1]`` (see the module docstring for packed rows).
        seq_ids, num_seqs: packed form: ``seq_ids [N]`` int64 in ``[0, num_seqs)``.
        impl: ``"auto" | "triton" | "cpp" | "torch"``.
        validate: check label / seq id ranges (host sync). ``None``: on for CPU tensors only.

    Returns:
        ``SeqLogprob(logprob [S] float32 (float64 for float64 logits), num_tokens [S] int64)`` with ``S = B``
        or ``num_seqs``.
    """
    op = "sequence_logprob"
    _check_float(logits, "logits", op)
    if seq_ids is None and logits.dim() != 3:
        raise ValueError(f"{op}: padded form expects logits [B, T, V], got shape {tuple(logits.shape)}")
    if seq_ids is not None and logits.dim() != 2:
        raise ValueError(f"{op}: packed form expects logits [N, V], got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    targets, sids, S = _rows(
        labels, seq_ids, num_seqs, shift=shift, ignore_index=ignore_index, lead_shape=tuple(logits.shape[:-1]),
        device=logits.device, op=op,
    )  # fmt: skip
    if _want_validate(validate, logits.device):
        _validate_rows(targets, sids, S, V, ignore_index, op)
    resolved = resolve_impl(op, impl, logits.device, logits.dtype)
    flat = logits.reshape(-1, V)
    logprob, num_tokens, _ = _fwd_op(flat, targets, sids, S, int(ignore_index), resolved)
    return _out(logprob, num_tokens)


def linear_sequence_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    impl: str = "auto",
    validate: bool | None = None,
) -> SeqLogprob:
    """Per-sequence log-likelihood fused with the lm_head: ``logits = softcap(hidden @ weight.T + bias)``.

    Logits are never materialised beyond a bounded tile; rows whose label is ignored are dropped before any
    matmul. Differentiable w.r.t. ``hidden``, and w.r.t. ``weight`` / ``bias`` only when they require grad.

    Args:
        hidden: ``[B, T, H]`` (padded) or ``[N, H]`` (packed), float16 / bfloat16 / float32 / float64.
        weight: lm_head ``[V, H]``, same dtype and device as ``hidden``.
        labels: ``[B, T]`` or ``[N]`` int64.
        bias: optional ``[V]``, same dtype as ``weight``.
        softcap: optional ``c > 0``: logits become ``c * tanh(logits / c)`` (Gemma-2).
        seq_ids, num_seqs: packed form: ``seq_ids [N]`` int64 in ``[0, num_seqs)``.
        impl, validate: see :func:`sequence_logprob`.

    Returns:
        ``SeqLogprob(logprob [S] float32 (float64 for float64 inputs), num_tokens [S] int64)``.
    """
    op = "linear_sequence_logprob"
    softcap = _check_softcap(softcap, op)
    _check_head(hidden, weight, bias, op)
    flat, lead = _flatten_hidden(hidden, seq_ids, op)
    targets, sids, S = _rows(
        labels,
        seq_ids,
        num_seqs,
        shift=shift,
        ignore_index=ignore_index,
        lead_shape=lead,
        device=hidden.device,
        op=op,
    )
    if _want_validate(validate, hidden.device):
        _validate_rows(targets, sids, S, weight.shape[0], ignore_index, op)
    resolved = resolve_impl(op, impl, hidden.device, hidden.dtype)
    any_grad, wb_grad = _grad_mode(hidden, weight, bias)
    mode = "none" if not any_grad else ("recompute" if wb_grad else _frozen_strategy(hidden.device))
    ng = flat.shape[0] if any_grad else 0
    logprob, num_tokens, _, _ = _linear_fwd_op(
        flat, weight, bias, targets, sids, S, ng, softcap, int(ignore_index), mode, resolved
    )
    return _out(logprob, num_tokens)


def _paired_side(side, name, op):
    if not isinstance(side, (tuple, list)) or len(side) not in (2, 4):
        raise TypeError(f"{op}: {name} must be (hidden, labels) or (hidden, labels, seq_ids, num_seqs)")
    if len(side) == 2:
        return side[0], side[1], None, None
    return tuple(side)


def paired_sequence_logprob(
    weight: torch.Tensor,
    completion: tuple,
    refusal: tuple,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    impl: str = "auto",
    validate: bool | None = None,
) -> tuple[SeqLogprob, SeqLogprob]:
    """Completion and refusal log-likelihoods in one fused launch.

    Args:
        weight: lm_head ``[V, H]``; bias: optional ``[V]``; softcap, ignore_index, shift, impl, validate: as in
            :func:`linear_sequence_logprob`.
        completion: ``(hidden [B, T, H], labels [B, T])`` or packed ``(hidden [N, H], labels [N], seq_ids [N],
            num_seqs)``. Carries gradients (hidden, and weight / bias when they require grad).
        refusal: same forms (independently padded or packed). Never carries an autograd graph: its hidden states
            are detached and its rows contribute neither to dH nor to dW.

    Returns:
        ``(SeqLogprob for the completions [S_c], SeqLogprob for the refusals [S_r])``.
    """
    op = "paired_sequence_logprob"
    softcap = _check_softcap(softcap, op)
    hc, lc, sc, nc = _paired_side(completion, "completion", op)
    hr, lr, sr, nr = _paired_side(refusal, "refusal", op)
    _check_head(hc, weight, bias, op)
    _check_head(hr, weight, bias, op)
    fc, lead_c = _flatten_hidden(hc, sc, op)
    fr, lead_r = _flatten_hidden(hr.detach(), sr, op)
    tc, ic, Sc = _rows(
        lc, sc, nc, shift=shift, ignore_index=ignore_index, lead_shape=lead_c, device=hc.device, op=op
    )
    tr, ir, Sr = _rows(
        lr, sr, nr, shift=shift, ignore_index=ignore_index, lead_shape=lead_r, device=hr.device, op=op
    )
    V = weight.shape[0]
    if _want_validate(validate, hc.device):
        _validate_rows(tc, ic, Sc, V, ignore_index, op + " (completion)")
        _validate_rows(tr, ir, Sr, V, ignore_index, op + " (refusal)")
    resolved = resolve_impl("linear_sequence_logprob", impl, hc.device, hc.dtype)
    any_grad, wb_grad = _grad_mode(hc, weight, bias)
    mode = "none" if not any_grad else ("recompute" if wb_grad else _frozen_strategy(hc.device))
    ng = fc.shape[0] if any_grad else 0
    flat = torch.cat([fc, fr], dim=0)
    targets = torch.cat([tc, tr])
    sids = torch.cat([ic, ir + Sc])
    logprob, num_tokens, _, _ = _linear_fwd_op(
        flat, weight, bias, targets, sids, Sc + Sr, ng, softcap, int(ignore_index), mode, resolved
    )
    lp_c, lp_r = logprob.split([Sc, Sr])
    nt_c, nt_r = num_tokens.split([Sc, Sr])
    return _out(lp_c, nt_c), _out(lp_r.detach(), nt_r)


# ------------------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------------------


def sequence_logprob_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    softcap: float | None = None,
) -> SeqLogprob:
    """Readable reference: materialised ``log_softmax`` + gather + segment sum (float64 in, float64 out: the
    tests' oracle). ``logits [B, T, V]`` or ``[N, V]``; returns ``SeqLogprob([S], [S] int64)``."""
    V = logits.shape[-1]
    targets, sids, S = _rows(
        labels, seq_ids, num_seqs, shift=shift, ignore_index=ignore_index, lead_shape=tuple(logits.shape[:-1]),
        device=logits.device, op="sequence_logprob_reference",
    )  # fmt: skip
    z = logits.reshape(-1, V).to(_acc_dtype(logits.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    tok = logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    tok = torch.where(valid, tok, torch.zeros_like(tok))
    logprob = torch.zeros(S, dtype=z.dtype, device=z.device).index_add(0, sids, tok)
    logprob = torch.where(torch.isfinite(logprob), logprob, torch.full_like(logprob, float("nan")))
    num_tokens = torch.zeros(S, dtype=torch.long, device=z.device).index_add(0, sids, valid.long())
    return SeqLogprob(logprob, num_tokens)


def linear_sequence_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> SeqLogprob:
    """Reference that materialises the full logits ``hidden @ weight.T + bias`` (in the input dtype), then
    upcasts like HF and calls :func:`sequence_logprob_reference`. Shapes as :func:`linear_sequence_logprob`."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return sequence_logprob_reference(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        seq_ids=seq_ids,
        num_seqs=num_seqs,
        softcap=softcap,
    )


def linear_sequence_logprob_chunked_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    chunk_rows: int = 512,
) -> SeqLogprob:
    """Pure-torch chunked version (padded form) with no data-dependent shapes, meant for ``torch.compile``:
    logits exist one ``[chunk_rows, V]`` block at a time in the forward. ``hidden [B, T, H]``, ``labels [B, T]``."""
    B, T, H = hidden.shape
    targets, sids, S = _rows(
        labels, None, None, shift=shift, ignore_index=ignore_index, lead_shape=(B, T), device=hidden.device,
        op="linear_sequence_logprob_chunked_reference",
    )  # fmt: skip
    flat = hidden.reshape(-1, H)
    acc = _acc_dtype(hidden.dtype)
    parts = []
    for start in range(0, flat.shape[0], chunk_rows):
        h = flat[start : start + chunk_rows]
        tgt = targets[start : start + chunk_rows]
        z = (h @ weight.t()).to(acc)
        if bias is not None:
            z = z + bias.to(acc)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        valid = tgt != ignore_index
        lp = z.gather(1, torch.where(valid, tgt, 0)[:, None]).squeeze(1) - torch.logsumexp(z, 1)
        parts.append(torch.where(valid, lp, torch.zeros_like(lp)))
    tok = torch.cat(parts) if parts else flat.new_zeros(0, dtype=acc)
    # padded rows: the segment sum is a reshape + sum (no scatter, which inductor's CPU codegen mishandles)
    logprob = tok.view(B, T).sum(1)
    num_tokens = (targets != ignore_index).view(B, T).sum(1)
    return SeqLogprob(logprob, num_tokens)
