"""The pure-torch twin of the per-sequence log-likelihood ops, and the readable references.

* The ``torch`` implementation of the four custom-op stages (chunked over the scored rows, logits never
  materialised beyond one chunk; the CUDA last resort): :func:`linear_sequence_logprob_fwd`,
  :func:`linear_sequence_logprob_bwd`, :func:`sequence_logprob_fwd`, :func:`sequence_logprob_bwd`. Each takes
  its tensors and one params dataclass (:class:`LinearParams` ...), like the ``cpp`` and ``triton`` twins.
* The references that materialise the logits: :func:`sequence_logprob_reference` and
  :func:`linear_sequence_logprob_reference` (float64 in, float64 out: the tests' oracle; the benchmarks'
  "torch reference"), and :func:`linear_sequence_logprob_chunked_reference` (no data-dependent shape, meant for
  ``torch.compile``).

Accumulation is float32 (float64 for float64 inputs) whatever the input dtype (docs/design.md §5).
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._dtypes import acc_dtype
from ._validate import to_rows


class TokenLogprob(NamedTuple):
    """Per-token result of :func:`~antibody_fast.ops.sequence_logprob.linear_token_logprob`, each of the labels'
    leading shape (``[B, T]`` or ``[N]``), 0 / False where nothing is scored. ``log_probs``: ``log p(label)``,
    float32 (float64 for float64 inputs), differentiable. ``entropy``: the next-token distribution's entropy, and
    ``is_top1``: bool, the label is the most likely token (both ``None`` unless asked for; never differentiable).
    ``mask``: bool, the scored positions."""

    log_probs: torch.Tensor
    entropy: torch.Tensor | None
    is_top1: torch.Tensor | None
    mask: torch.Tensor


class SeqLogprob(NamedTuple):
    """Per-sequence result. ``logprob``: ``[S]`` float32 (float64 for float64 inputs), the sum of
    ``log p(label)`` over scored positions (0 for a sequence with none). ``num_tokens``: ``[S]`` int64."""

    logprob: torch.Tensor
    num_tokens: torch.Tensor


# ------------------------------------------------------------------------------------------------------------
# the params each implementation takes (the custom ops' schemas list the same fields flat)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearParams:
    """Scalars of ``linear_sequence_logprob_fwd``."""

    num_seqs: int  # S: per-sequence outputs; seq_ids lie in [0, S)
    num_grad_rows: int  # rows [0, num_grad_rows) may carry gradient (the completion rows)
    softcap: float | None  # logits -> softcap * tanh(logits / softcap), or None
    ignore_index: int  # the target of an unscored row
    mode: str  # gradient strategy: "none" | "precompute" | "recompute" (the package docstring)
    row_stats: bool  # also per-row entropy [N] and top-1 flag [N] (0 / False on unscored rows)


@dataclass(frozen=True)
class LinearGradParams:
    """Scalars of ``linear_sequence_logprob_bwd``: which gradients to produce, and the forward's scalars."""

    num_grad_rows: int
    softcap: float | None
    ignore_index: int
    need_dh: bool
    need_dw: bool
    need_db: bool


@dataclass(frozen=True)
class LogitsParams:
    """Scalars of ``sequence_logprob_fwd``."""

    num_seqs: int
    ignore_index: int


@dataclass(frozen=True)
class LogitsGradParams:
    """Scalars of ``sequence_logprob_bwd``."""

    ignore_index: int


# ------------------------------------------------------------------------------------------------------------
# the torch implementation of the custom ops
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


def _row_targets(valid, targets, rows):
    """``(ok, tgt)`` of a chunk of rows: whether each is scored, and its target (0 where it is not)."""
    ok = valid.index_select(0, rows)
    return ok, torch.where(ok, targets.index_select(0, rows), 0)


def _tile_logits(hidden, rows, w, b, softcap, acc):
    """``(h, z, t)``: the chunk's hidden rows and logits in ``acc`` (soft-capped), and ``tanh(z / softcap)``
    for the soft-cap's derivative (``None`` without soft-cap)."""
    h = hidden.index_select(0, rows).to(acc)
    z = h @ w.t()
    if b is not None:
        z = z + b
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    return h, z, t


def _row_logprob(z, row_lse, ok, tgt):
    """``log p(target)`` per row: NaN where it is not finite, 0 on an unscored row."""
    lp = z.gather(1, tgt[:, None]).squeeze(1) - row_lse
    lp = torch.where(torch.isfinite(lp), lp, torch.full_like(lp, float("nan")))
    return torch.where(ok, lp, torch.zeros_like(lp))


def _dlogp_dz(z, row_lse, tgt, t):
    """``d log p(target) / dz`` per row: ``onehot - softmax``, times the soft-cap's derivative when ``t`` is
    given (``z = softcap * t``)."""
    dz = -(z - row_lse[:, None]).exp()
    dz.scatter_add_(1, tgt[:, None], torch.ones_like(dz[:, :1]))
    if t is not None:
        dz = dz * (1 - t * t)
    return dz


def _times_seq_grad(dz, g_all, seq_ids, rows, ok):
    """``dz`` scaled, row by row, by the output gradient of the row's sequence (0 on an unscored row)."""
    gs = g_all.index_select(0, seq_ids.index_select(0, rows))
    return dz * torch.where(ok, gs, torch.zeros_like(gs))[:, None]


def _row_stats(z, row_lse, ok, tgt):
    """``(entropy, top1)`` per row: ``lse - sum_v p_v z_v`` (terms with ``p_v = 0`` skipped, so a ``-inf``
    logit adds nothing) and whether the target's logit is the largest; 0 / False on an unscored row."""
    p = (z - row_lse[:, None]).exp()
    pz = torch.where(p > 0, p * z, torch.zeros_like(z)).sum(1)
    ent = row_lse - pz
    ent = torch.where(torch.isfinite(ent), ent, torch.full_like(ent, float("nan")))
    top = z.gather(1, tgt[:, None]).squeeze(1) >= z.amax(1)
    return torch.where(ok, ent, torch.zeros_like(ent)), top & ok


def linear_sequence_logprob_fwd(hidden, weight, bias, targets, seq_ids, p: LinearParams):
    """``(logprob [S], num_tokens [S], lse [N], dh [num_grad_rows or 0, H], entropy [N or 0], top1 [N or 0]
    bool)``, chunked over the scored rows."""
    S, ng, softcap, ignore_index, mode = p.num_seqs, p.num_grad_rows, p.softcap, p.ignore_index, p.mode
    N, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    logprob = torch.zeros(S, dtype=acc, device=dev)
    num_tokens = torch.zeros(S, dtype=torch.long, device=dev)
    lse = torch.zeros(N, dtype=acc, device=dev)
    dh = torch.zeros(ng if mode == "precompute" else 0, H, dtype=acc, device=dev)
    n_stats = N if p.row_stats else 0
    entropy = torch.zeros(n_stats, dtype=acc, device=dev)
    top1 = torch.zeros(n_stats, dtype=torch.bool, device=dev)
    valid = targets != ignore_index
    num_tokens.index_add_(0, seq_ids, valid.long())
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    _chunk_start = [0]  # first row of the current chunk when rows are not compacted (CUDA)
    for rows in _scored_rows(valid).split(_chunk_rows(V)):
        _, z, t = _tile_logits(hidden, rows, w, b, softcap, acc)
        m = z.amax(1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        row_lse = (z - m).exp().sum(1).log() + m.squeeze(1)
        ok, tgt = _row_targets(valid, targets, rows)
        lp = _row_logprob(z, row_lse, ok, tgt)
        lse.index_copy_(0, rows, row_lse)
        logprob.index_add_(0, seq_ids.index_select(0, rows), lp)
        if p.row_stats:
            ent, top = _row_stats(z, row_lse, ok, tgt)
            entropy.index_copy_(0, rows, ent)
            top1.index_copy_(0, rows, top)
        if mode == "precompute":
            g = rows < ng
            dz = _dlogp_dz(z, row_lse, tgt, t)
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
    return logprob, num_tokens, lse, dh, entropy, top1


def linear_sequence_logprob_bwd(grad, hidden, weight, bias, targets, seq_ids, lse, p: LinearGradParams):
    """``(dh [N, H] or [0], dw [V, H] or [0], db [V] or [0])``: the logit tiles recomputed chunk by chunk."""
    ng, softcap, ignore_index = p.num_grad_rows, p.softcap, p.ignore_index
    nh, nw, nb = p.need_dh, p.need_dw, p.need_db
    N, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    dh = torch.zeros(N, H, dtype=acc, device=dev) if nh else None
    dw = torch.zeros(V, H, dtype=acc, device=dev) if nw else None
    db = torch.zeros(V, dtype=acc, device=dev) if nb else None
    valid = (targets != ignore_index) & (torch.arange(N, device=dev) < ng)
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    g_all = grad.to(acc)
    for rows in _scored_rows(valid).split(_chunk_rows(V)):
        h, z, t = _tile_logits(hidden, rows, w, b, softcap, acc)
        ok, tgt = _row_targets(valid, targets, rows)
        dz = _dlogp_dz(z, lse.index_select(0, rows), tgt, t)
        dz = _times_seq_grad(dz, g_all, seq_ids, rows, ok)
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


def sequence_logprob_fwd(logits, targets, seq_ids, p: LogitsParams):
    """``(logprob [S], num_tokens [S], lse [N])`` from materialised logits ``[N, V]``."""
    S, ignore_index = p.num_seqs, p.ignore_index
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    dev = logits.device
    logprob = torch.zeros(S, dtype=acc, device=dev)
    num_tokens = torch.zeros(S, dtype=torch.long, device=dev)
    lse = torch.zeros(N, dtype=acc, device=dev)
    valid = targets != ignore_index
    num_tokens.index_add_(0, seq_ids, valid.long())
    for rows in _scored_rows(valid).split(_chunk_rows(V)):
        z = logits.index_select(0, rows).to(acc)
        row_lse = torch.logsumexp(z, 1)
        ok, tgt = _row_targets(valid, targets, rows)
        lp = _row_logprob(z, row_lse, ok, tgt)
        lse.index_copy_(0, rows, row_lse)
        logprob.index_add_(0, seq_ids.index_select(0, rows), lp)
    return logprob, num_tokens, lse


def sequence_logprob_bwd(grad, logits, targets, seq_ids, lse, p: LogitsGradParams):
    """``d_logits [N, V]`` in the logits' dtype."""
    ignore_index = p.ignore_index
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    out = torch.zeros(N, V, dtype=logits.dtype, device=logits.device)
    valid = targets != ignore_index
    g_all = grad.to(acc)
    for rows in _scored_rows(valid).split(_chunk_rows(V)):
        z = logits.index_select(0, rows).to(acc)
        ok, tgt = _row_targets(valid, targets, rows)
        dz = _dlogp_dz(z, lse.index_select(0, rows), tgt, None)
        dz = _times_seq_grad(dz, g_all, seq_ids, rows, ok)
        out.index_copy_(0, rows, dz.to(logits.dtype))
    return out


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
    targets, sids, S = to_rows(
        labels, seq_ids, num_seqs, shift=shift, ignore_index=ignore_index, lead_shape=tuple(logits.shape[:-1]),
        device=logits.device, op="sequence_logprob_reference",
    )  # fmt: skip
    z = logits.reshape(-1, V).to(acc_dtype(logits.dtype))
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


def linear_token_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    shift: bool = True,
) -> TokenLogprob:
    """Readable reference of the per-token op: the full logits, ``log_softmax``, the entropy
    ``-sum(p log p)`` and ``argmax == label``. ``hidden [B, T, H]`` with ``labels [B, T]`` (``shift`` as
    :func:`linear_sequence_logprob`) or rows ``hidden [N, H]`` with ``labels [N]`` (no shift)."""
    lead = tuple(labels.shape)
    labels = labels.long()
    if shift and labels.dim() == 2:
        labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)
    z = (hidden @ weight.t()).reshape(-1, weight.shape[0])
    if bias is not None:
        z = z + bias
    z = z.to(acc_dtype(hidden.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    t = labels.reshape(-1)
    valid = t != ignore_index
    tok = logp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    ent = -(logp.exp() * torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))).sum(1)
    top = z.argmax(1) == t
    zero = torch.zeros_like(tok)
    return TokenLogprob(
        torch.where(valid, tok, zero).reshape(lead),
        torch.where(valid, ent, zero).reshape(lead),
        (top & valid).reshape(lead),
        valid.reshape(lead),
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
    targets, sids, S = to_rows(
        labels, None, None, shift=shift, ignore_index=ignore_index, lead_shape=(B, T), device=hidden.device,
        op="linear_sequence_logprob_chunked_reference",
    )  # fmt: skip
    flat = hidden.reshape(-1, H)
    acc = acc_dtype(hidden.dtype)
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
