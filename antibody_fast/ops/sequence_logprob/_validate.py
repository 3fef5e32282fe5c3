"""Input checks and canonical rows of the per-sequence log-likelihood ops (shared by the public API and the
references). Every check raises ``TypeError`` / ``ValueError`` before anything is computed; only
:func:`validate_rows` syncs with the host (it runs when ``validate`` is on: by default for CPU tensors)."""

import math

import torch


def is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except Exception:  # pragma: no cover
        return False


def check_labels_dtype(labels: torch.Tensor, name: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an int64 (or int32) tensor, got {labels.dtype}")


def to_rows(
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
    check_labels_dtype(labels, f"{op}: labels")
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
    check_labels_dtype(seq_ids, f"{op}: seq_ids")
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


def validate_rows(
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


def want_validate(validate: bool | None, device: torch.device) -> bool:
    if is_compiling():
        return False  # data-dependent checks would break the graph; run them eagerly if needed
    return device.type == "cpu" if validate is None else bool(validate)


def check_float(t: torch.Tensor, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def check_softcap(softcap, op):
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


def check_head(hidden, weight, bias, op):
    check_float(hidden, "hidden", op)
    check_float(weight, "weight", op)
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
        check_float(bias, "bias", op)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(
                f"{op}: bias ({bias.dtype}, {bias.device}) must match weight ({weight.dtype}, {weight.device})"
            )


def flatten_hidden(hidden, seq_ids, op):
    if seq_ids is None:
        if hidden.dim() != 3:
            raise ValueError(f"{op}: padded form expects hidden [B, T, H], got shape {tuple(hidden.shape)}")
        return hidden.reshape(-1, hidden.shape[-1]), tuple(hidden.shape[:2])
    if hidden.dim() != 2:
        raise ValueError(f"{op}: packed form expects hidden [N, H], got shape {tuple(hidden.shape)}")
    return hidden, (hidden.shape[0],)


def paired_side(side, name, op):
    if not isinstance(side, (tuple, list)) or len(side) not in (2, 4):
        raise TypeError(f"{op}: {name} must be (hidden, labels) or (hidden, labels, seq_ids, num_seqs)")
    if len(side) == 2:
        return side[0], side[1], None, None
    return tuple(side)
