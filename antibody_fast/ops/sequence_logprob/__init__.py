"""Per-sequence log-likelihood of labelled tokens, optionally fused with the lm_head matmul.

Public API
----------
* :func:`sequence_logprob` -- from logits ``[B, T, V]`` (or packed ``[N, V]``).
* :func:`linear_sequence_logprob` -- from hidden states ``[B, T, H]`` and the lm_head weight ``[V, H]``;
  logits are never materialised beyond a bounded tile and ignored rows are dropped before any matmul.
* :func:`linear_token_logprob` -- the same fused op with one "sequence" per position: per-token log-probs
  (differentiable) and, on request, each position's entropy and top-1 flag, computed in the same pass (the
  outputs TRL's fused-head slot expects; :mod:`antibody_fast.integrations.trl`).
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

Layers (CONTRIBUTING.md "Adding an op"): ``_validate.py`` (input checks, canonical rows), ``_torch.py`` (the
torch twin, the params dataclasses and the references), ``_triton.py`` (launchers of
``kernels/sequence_logprob.py``), ``_cpp.py`` (binding to ``csrc/sequence_logprob.cpp``), ``_register.py`` (the
``torch.ops.antibody_fast.{linear_,}sequence_logprob_{fwd,bwd}`` custom ops, their fakes and autograd; the
resolved impl string is an op argument). Importing this package registers the ops; it does not import triton.

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

import os

import torch

from ...dispatch import resolve_impl
from . import _register
from ._torch import (
    SeqLogprob,
    TokenLogprob,
    linear_sequence_logprob_chunked_reference,
    linear_sequence_logprob_reference,
    linear_token_logprob_reference,
    sequence_logprob_reference,
)

# the Triton launch configuration, public for antibody_fast.gpu_compile (it compiles what the launchers allow)
from ._triton import (  # noqa: F401
    COMBINE_BLOCKS,
    DZ_BUDGET,
    LINEAR_CONFIGS,
    bwd_chunk,
    config_kind,
    fwd_chunk,
    logits_block,
)
from ._validate import (
    check_float,
    check_head,
    check_softcap,
    flatten_hidden,
    paired_side,
    to_rows,
    validate_rows,
    want_validate,
)

__all__ = [
    "SeqLogprob",
    "TokenLogprob",
    "linear_token_logprob",
    "linear_token_logprob_reference",
    "sequence_logprob",
    "linear_sequence_logprob",
    "paired_sequence_logprob",
    "sequence_logprob_reference",
    "linear_sequence_logprob_reference",
    "linear_sequence_logprob_chunked_reference",
    "FROZEN_STRATEGY",
]


# Frozen-lm_head strategy per device type (see module docstring).
# * CPU: precompute (2 matmuls per scored row against 3 for recompute). Measured on the 2-core development
#   CPU (N=2048 rows, 1/4 ignored, H=256, V=32000, fp32, fwd+bwd, 2 threads, C++): 0.33 s vs 0.67 s best
#   wall time (0.65 s vs 1.08 s CPU time); the matmul floor was 0.27 s, the materialised reference 1.14 s.
# * CUDA: recompute, by FLOP count (see "Frozen lm_head on CUDA" in _triton.py): both cost
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


def _grad_plan(hidden, weight, bias, grad_rows: int) -> tuple[str, int]:
    """``(mode, num_grad_rows)`` of the fused op: ``"none"`` and 0 without any gradient, ``"recompute"`` when the
    weight or bias needs one, else the frozen-weight strategy of the device; ``grad_rows`` rows carry gradient."""
    if not torch.is_grad_enabled():
        return "none", 0
    wb = weight.requires_grad or (bias is not None and bias.requires_grad)
    if not (hidden.requires_grad or wb):
        return "none", 0
    return ("recompute" if wb else _frozen_strategy(hidden.device)), grad_rows


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
    check_float(logits, "logits", op)
    if seq_ids is None and logits.dim() != 3:
        raise ValueError(f"{op}: padded form expects logits [B, T, V], got shape {tuple(logits.shape)}")
    if seq_ids is not None and logits.dim() != 2:
        raise ValueError(f"{op}: packed form expects logits [N, V], got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    targets, sids, S = to_rows(
        labels, seq_ids, num_seqs, shift=shift, ignore_index=ignore_index, lead_shape=tuple(logits.shape[:-1]),
        device=logits.device, op=op,
    )  # fmt: skip
    if want_validate(validate, logits.device):
        validate_rows(targets, sids, S, V, ignore_index, op)
    resolved = resolve_impl(op, impl, logits.device, logits.dtype)
    flat = logits.reshape(-1, V)
    logprob, num_tokens, _ = _register.sequence_logprob_fwd(
        flat, targets, sids, S, int(ignore_index), resolved
    )
    return SeqLogprob(logprob, num_tokens)


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
    softcap = check_softcap(softcap, op)
    check_head(hidden, weight, bias, op)
    flat, lead = flatten_hidden(hidden, seq_ids, op)
    targets, sids, S = to_rows(
        labels,
        seq_ids,
        num_seqs,
        shift=shift,
        ignore_index=ignore_index,
        lead_shape=lead,
        device=hidden.device,
        op=op,
    )
    if want_validate(validate, hidden.device):
        validate_rows(targets, sids, S, weight.shape[0], ignore_index, op)
    resolved = resolve_impl(op, impl, hidden.device, hidden.dtype)
    mode, ng = _grad_plan(hidden, weight, bias, flat.shape[0])
    logprob, num_tokens, *_ = _register.linear_sequence_logprob_fwd(
        flat, weight, bias, targets, sids, S, ng, softcap, int(ignore_index), mode, False, resolved
    )
    return SeqLogprob(logprob, num_tokens)


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
    softcap = check_softcap(softcap, op)
    hc, lc, sc, nc = paired_side(completion, "completion", op)
    hr, lr, sr, nr = paired_side(refusal, "refusal", op)
    check_head(hc, weight, bias, op)
    check_head(hr, weight, bias, op)
    fc, lead_c = flatten_hidden(hc, sc, op)
    fr, lead_r = flatten_hidden(hr.detach(), sr, op)
    tc, ic, Sc = to_rows(
        lc, sc, nc, shift=shift, ignore_index=ignore_index, lead_shape=lead_c, device=hc.device, op=op
    )
    tr, ir, Sr = to_rows(
        lr, sr, nr, shift=shift, ignore_index=ignore_index, lead_shape=lead_r, device=hr.device, op=op
    )
    V = weight.shape[0]
    if want_validate(validate, hc.device):
        validate_rows(tc, ic, Sc, V, ignore_index, op + " (completion)")
        validate_rows(tr, ir, Sr, V, ignore_index, op + " (refusal)")
    resolved = resolve_impl("linear_sequence_logprob", impl, hc.device, hc.dtype)
    mode, ng = _grad_plan(hc, weight, bias, fc.shape[0])
    flat = torch.cat([fc, fr], dim=0)
    targets = torch.cat([tc, tr])
    sids = torch.cat([ic, ir + Sc])
    logprob, num_tokens, *_ = _register.linear_sequence_logprob_fwd(
        flat, weight, bias, targets, sids, Sc + Sr, ng, softcap, int(ignore_index), mode, False, resolved
    )
    lp_c, lp_r = logprob.split([Sc, Sr])
    nt_c, nt_r = num_tokens.split([Sc, Sr])
    return SeqLogprob(lp_c, nt_c), SeqLogprob(lp_r.detach(), nt_r)


def linear_token_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    stats: bool = False,
    impl: str = "auto",
    validate: bool | None = None,
) -> TokenLogprob:
    """Per-token ``log p(label)`` fused with the lm_head (the per-sequence kernels with one sequence per row), and
    with ``stats`` each scored position's entropy and top-1 flag from the same pass over the logits.

    Args:
        hidden: ``[B, T, H]`` with ``labels [B, T]`` (``shift``: position ``t`` scores ``labels[:, t + 1]``, the
            last position nothing), or rows ``[N, H]`` with ``labels [N]`` (row ``i`` scores ``labels[i]``).
        weight, bias, softcap, ignore_index, impl, validate: as :func:`linear_sequence_logprob`.
        stats: also compute ``entropy`` and ``is_top1`` (metrics: no gradient flows through them).

    Returns:
        :class:`TokenLogprob` ``(log_probs, entropy, is_top1, mask)``, each of the labels' shape; 0 / False on
        unscored positions. ``log_probs`` is float32 (float64 for float64 inputs) and differentiable w.r.t.
        ``hidden`` (and ``weight`` / ``bias`` when they require grad).
    """
    op = "linear_token_logprob"
    softcap = check_softcap(softcap, op)
    check_head(hidden, weight, bias, op)
    rows_form = hidden.dim() == 2
    if rows_form:
        if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"{op}: rows form expects labels [N] with N = {hidden.shape[0]}, got {tuple(labels.shape)}"
            )
        flat, lead = hidden, (hidden.shape[0],)
    else:
        flat, lead = flatten_hidden(hidden, None, op)
    N = flat.shape[0]
    sids = torch.arange(N, device=hidden.device)  # one "sequence" per row
    targets, _, _ = to_rows(
        labels, sids if rows_form else None, N if rows_form else None, shift=shift and not rows_form,
        ignore_index=ignore_index, lead_shape=lead, device=hidden.device, op=op,
    )  # fmt: skip
    if want_validate(validate, hidden.device):
        validate_rows(targets, sids, N, weight.shape[0], ignore_index, op)
    resolved = resolve_impl("linear_sequence_logprob", impl, hidden.device, hidden.dtype)
    mode, ng = _grad_plan(hidden, weight, bias, N)
    logprob, _, _, _, entropy, top1 = _register.linear_sequence_logprob_fwd(
        flat, weight, bias, targets, sids, N, ng, softcap, int(ignore_index), mode, bool(stats), resolved
    )
    shape = tuple(labels.shape)
    return TokenLogprob(
        logprob.reshape(shape),
        entropy.reshape(shape) if stats else None,
        top1.reshape(shape) if stats else None,
        (targets != ignore_index).reshape(shape),
    )
