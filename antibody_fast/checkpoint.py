"""Training checkpoints: trainable weights, optimizer, scheduler, :class:`~antibody_fast.steps.AlignState`
and every RNG state, written atomically.

* Only the **trainable** parameters (``requires_grad``, e.g. the LoRA adapters) are stored, keyed by their
  names in ``model.named_parameters()``; frozen base weights are not (rebuild the model from its config or
  pretrained files, then load the checkpoint).
* RNG states: torch CPU, torch CUDA (every device, when CUDA is initialised), Python ``random`` and NumPy
  (when installed). They are stored as plain tensors / lists, so loading uses ``torch.load(weights_only=True)``
  (no arbitrary unpickling).
* Atomic write: the file is written to a temporary name in the destination directory, flushed and fsynced,
  then ``os.replace``-d onto ``path`` (and the directory fsynced). A crash leaves either the old file or the
  new one, never a torn one.
* :func:`load_checkpoint` reads and validates everything (format, parameter names, shapes and dtypes,
  optimizer groups) **before** changing the model, optimizer, scheduler or state; a missing, truncated or
  mismatching checkpoint raises ``FileNotFoundError`` / ``ValueError`` and leaves them untouched.

* Integrity (docs/reliability.md): every checkpoint stores a SHA-256 ``checksum`` of its whole content
  (every tensor's dtype, shape and bytes, every plain value), verified on load, so a flipped byte is refused;
  and an optional ``fingerprint`` (a flat dict of the options that define the run: data, method, seed, model,
  LoRA shape, hyper-parameters). ``load_checkpoint(..., fingerprint=...)`` refuses a checkpoint whose stored
  fingerprint differs, naming the differing options (:class:`CheckpointMismatchError`), unless ``force=True``.
* Non-finite values are never written: :func:`save_checkpoint` raises :class:`NonFiniteCheckpointError`
  before creating any file when a parameter, an optimizer-state tensor or the state holds NaN/inf, so the
  last good checkpoint stays in place.
* :func:`cleanup_temporaries` removes ``.tmp-<name>.*`` files left by a save that was killed (SIGKILL,
  power loss); call it at start-up while holding the output directory's lock.

A run stopped after step k and resumed from its checkpoint ends with the same parameters as an
uninterrupted run (tested on CPU with deterministic kernels).
"""

from __future__ import annotations

import copy
import glob
import hashlib
import os
from typing import Any

import torch

from ._io import atomic_open, temporary_prefix
from ._model import named_trainable, unwrap_ddp
from ._rng import check_rng, rng_state, set_rng_state
from .distributed import all_reduce_sum, is_dtensor, local_tensor

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "cleanup_temporaries",
    "fingerprint_diff",
    "CheckpointMismatchError",
    "NonFiniteCheckpointError",
    "CHECKPOINT_FORMAT",
]


class CheckpointMismatchError(ValueError):
    """The checkpoint belongs to another run: its stored options fingerprint differs from the expected one."""

    def __init__(self, message: str, differing: list[str]) -> None:
        super().__init__(message)
        self.differing = differing


class NonFiniteCheckpointError(ValueError):
    """A checkpoint or adapter would contain NaN/inf values; nothing was written."""


CHECKPOINT_FORMAT = "antibody_fast.checkpoint/1"


def _digest(obj: Any, h) -> None:
    """Feed ``obj`` (nested dicts / lists / tuples of tensors and plain values) into the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            h.update(repr(k).encode())
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def _checksum(payload: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "checksum"}, h)
    return h.hexdigest()


def _nonfinite_tensors(obj: Any, where: str, out: list[str]) -> None:
    if isinstance(obj, torch.Tensor):
        t = local_tensor(obj)  # a DTensor: this rank's shard
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            out.append(where)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _nonfinite_tensors(v, f"{where}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _nonfinite_tensors(v, f"{where}[{i}]", out)


def fingerprint_diff(saved: dict | None, expected: dict | None) -> list[str]:
    """Names of the options whose values differ between two fingerprints (``"name: saved -> expected"``)."""
    saved = saved or {}
    expected = expected or {}
    out = []
    for k in sorted(set(saved) | set(expected), key=str):
        a, b = saved.get(k, "<absent>"), expected.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def cleanup_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove the ``.tmp-<basename>.*`` files that an interrupted :func:`save_checkpoint` of ``path`` left in
    its directory (only files; hold the directory's lock so that no save is running). Returns the paths."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = os.path.join(glob.escape(directory), glob.escape(temporary_prefix(path)) + "*")
    removed = []
    for f in glob.glob(pattern):
        if os.path.isfile(f) and not os.path.islink(f):
            try:
                os.unlink(f)
                removed.append(f)
            except FileNotFoundError:  # pragma: no cover - raced with another cleaner
                pass
    return removed


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: Any = None,
    extra: dict | None = None,
    *,
    fingerprint: dict | None = None,
    allow_nonfinite: bool = False,
) -> None:
    """Atomically write a training checkpoint to ``path``.

    Args:
        path: destination file; its directory must exist. An existing file is replaced atomically.
        model: the model (PEFT-wrapped or not, DDP-wrapped or not); its trainable parameters are saved
            (detached CPU copies in their own dtype).
        optimizer: saved with ``optimizer.state_dict()`` (optional).
        scheduler: any object with ``state_dict()`` (optional).
        state: an :class:`~antibody_fast.steps.AlignState` or anything with ``state_dict()`` (optional).
        extra: a dict of plain Python values / tensors stored as is (e.g. the step or epoch counter).
        fingerprint: a flat dict of plain values naming the options that define the run (checked by
            ``load_checkpoint(..., fingerprint=...)``).
        allow_nonfinite: write even when a tensor holds NaN/inf (default: raise
            :class:`NonFiniteCheckpointError` before writing anything).
    """
    params = named_trainable(unwrap_ddp(model))  # names without DDP's "module." prefix
    if not params:
        raise ValueError("save_checkpoint: the model has no trainable parameters (requires_grad=True)")
    if any(is_dtensor(p) for p in params.values()):
        _save_sharded(
            os.fspath(path), model, optimizer, scheduler, state, extra, fingerprint, allow_nonfinite
        )
        return
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "params": {n: p.detach().to("cpu", copy=True) for n, p in params.items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "state": state.state_dict() if state is not None else None,
        "rng": rng_state(),
        "extra": extra,
        "fingerprint": fingerprint,
    }
    if not allow_nonfinite:
        bad: list[str] = []
        for key in ("params", "optimizer", "state"):
            _nonfinite_tensors(payload[key], key, bad)
        if bad:
            raise NonFiniteCheckpointError(
                f"save_checkpoint: refusing to write {os.fspath(path)!r}: non-finite values (NaN/inf) in "
                f"{', '.join(bad[:5])}{'...' if len(bad) > 5 else ''}; the previous checkpoint is kept"
            )
    payload["checksum"] = _checksum(payload)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"save_checkpoint: directory {directory!r} does not exist")
    with atomic_open(path, "wb", durable=True) as f:
        torch.save(payload, f)


def _save_sharded(path, model, optimizer, scheduler, state, extra, fingerprint, allow_nonfinite) -> None:
    """FSDP2 (collective): every rank writes its shards of the weights and optimizer state with DCP
    (:mod:`antibody_fast.checkpoint_sharded`), then rank 0 writes the checkpoint file naming them."""
    import torch.distributed as dist

    from .checkpoint_sharded import remove_old_shards, save_shards, shard_state

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"save_checkpoint: directory {directory!r} does not exist")
    bad: list[str] = []
    if not allow_nonfinite:  # each rank checks its shards; every rank raises when any rank found one
        _nonfinite_tensors(shard_state(model, optimizer), "shards", bad)
        _nonfinite_tensors(state.state_dict() if state is not None else None, "state", bad)
        found = torch.tensor([len(bad)], device=next(model.parameters()).device)  # NCCL: a device tensor
        if int(all_reduce_sum(found)) and not bad:
            bad.append("(another rank's shards)")
    if bad:
        raise NonFiniteCheckpointError(
            f"save_checkpoint: refusing to write {path!r}: non-finite values (NaN/inf) in {', '.join(bad[:5])}; the "
            "previous checkpoint is kept"
        )
    anchor = getattr(state, "anchor", None)  # Lisa's anchor is per-rank shards: it travels with them
    anchor = anchor if isinstance(anchor, list) else None
    descriptor = save_shards(path, model, optimizer, anchor)
    if dist.get_rank() == 0:
        payload: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "params": {},
            "optimizer": None,
            "sharded": descriptor,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "state": _state_without_anchor(state, anchor),
            "rng": rng_state(),
            "extra": extra,
            "fingerprint": fingerprint,
        }
        payload["checksum"] = _checksum(payload)
        with atomic_open(path, "wb", durable=True) as f:
            torch.save(payload, f)
        remove_old_shards(path, descriptor["dir"])
    dist.barrier()


_ANCHOR_IN_SHARDS = "in the shards"


def _state_without_anchor(state, anchor) -> dict | None:
    if state is None:
        return None
    sd = state.state_dict()
    return sd if anchor is None else {**sd, "anchor": _ANCHOR_IN_SHARDS}


def _read(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"load_checkpoint: {path!r} is not a readable checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"load_checkpoint: {path!r} is not an antibody_fast checkpoint (expected format {CHECKPOINT_FORMAT!r})"
        )
    for key in ("params", "optimizer", "scheduler", "state", "rng", "extra"):
        if key not in payload:
            raise ValueError(f"load_checkpoint: {path!r} is missing the {key!r} entry (corrupt checkpoint?)")
    stored = payload.get("checksum")
    if stored is not None and stored != _checksum(payload):
        raise ValueError(
            f"load_checkpoint: {path!r} is corrupt: its content does not match its checksum (a changed byte in "
            "the tensor data?)"
        )
    return payload


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify (format, entries, checksum) a checkpoint without applying it: the raw payload dict
    (``params``, ``optimizer``, ``scheduler``, ``state``, ``rng``, ``extra``, ``fingerprint``, ``checksum``)."""
    return _read(os.fspath(path))


def _check_optimizer_state(osd: dict, optimizer: torch.optim.Optimizer) -> None:
    """The saved optimizer state must fit the optimizer's parameters: every per-parameter tensor is a scalar
    or has the parameter's shape (Adam's moments), and the state's keys are indices of the saved groups."""
    state = osd.get("state")
    if not isinstance(state, dict):
        raise ValueError("load_checkpoint: the optimizer entry has no 'state' dict")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in osd["param_groups"] for i in g.get("params", ())]
    index = dict(zip(saved_ids, params))
    for i, st in state.items():
        if i not in index:
            raise ValueError(f"load_checkpoint: optimizer state for unknown parameter index {i!r}")
        if not isinstance(st, dict):
            raise ValueError(f"load_checkpoint: optimizer state of parameter {i} is not a dict")
        p = index[i]
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise ValueError(
                    f"load_checkpoint: optimizer state {k!r} of parameter {i} has shape {tuple(v.shape)} but the "
                    f"parameter is {tuple(p.shape)}"
                )


def _check_state_dict_like(saved: Any, obj: Any, key: str) -> None:
    """The saved scheduler / state entry must be a dict with the keys the object's own state_dict has."""
    if not isinstance(saved, dict):
        raise ValueError(f"load_checkpoint: corrupt {key!r} entry (not a dict)")
    try:
        current = obj.state_dict()
    except Exception:  # pragma: no cover - an object without a usable state_dict: load_state_dict decides
        return
    if isinstance(current, dict) and set(current) != set(saved):
        raise ValueError(
            f"load_checkpoint: the {key} entry has keys {sorted(map(str, saved))} but the {key} expects "
            f"{sorted(map(str, current))}"
        )


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: Any = None,
    *,
    restore_rng: bool = True,
    fingerprint: dict | None = None,
    force: bool = False,
) -> dict | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``extra`` dict.

    The trainable parameters are copied **in place** (``param.copy_``), so parameter objects, optimizer
    references and :class:`~antibody_fast.flat.FlatParameters` views stay valid. Everything is validated
    before anything is modified: a missing file raises ``FileNotFoundError``; a corrupt file, different
    trainable parameter names/shapes/dtypes, a missing optimizer/scheduler/state entry that was asked for,
    or an optimizer with a different parameter-group layout or state shapes, a corrupt scheduler / state /
    RNG entry, or a checksum mismatch raise ``ValueError``; in all these cases the model, optimizer,
    scheduler and state are unchanged. Should applying still fail (an object's own ``load_state_dict``
    raising on a value that passed these checks), everything already applied is rolled back.

    With ``fingerprint`` (see :func:`save_checkpoint`) a checkpoint whose stored fingerprint differs raises
    :class:`CheckpointMismatchError` naming the differing options, unless ``force=True``.
    """
    path = os.fspath(path)
    payload = _read(path)
    if fingerprint is not None and not force:
        diff = fingerprint_diff(payload.get("fingerprint"), fingerprint)
        if diff:
            raise CheckpointMismatchError(
                f"load_checkpoint: {path!r} was written by a run with other options: {'; '.join(diff)} "
                "(resume with the original options, or force the resume)",
                diff,
            )
    params = named_trainable(unwrap_ddp(model))  # names without DDP's "module." prefix
    model_sharded = any(is_dtensor(p) for p in params.values())
    if payload.get("sharded") is not None or model_sharded:
        return _load_sharded(
            path, payload, model, optimizer, scheduler, state, restore_rng, params, model_sharded
        )
    saved = payload["params"]
    if not isinstance(saved, dict):
        raise ValueError(f"load_checkpoint: {path!r} has a corrupt 'params' entry")
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            "load_checkpoint: trainable parameters differ from the checkpoint: "
            f"missing in checkpoint {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"not trainable in the model {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for n, p in params.items():
        t = saved[n]
        if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype:
            raise ValueError(
                f"load_checkpoint: parameter {n!r} is {tuple(p.shape)} {p.dtype} in the model but "
                f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', type(t).__name__)} in the checkpoint"
            )
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (state, "state")):
        if obj is not None and payload[key] is None:
            raise ValueError(f"load_checkpoint: a {key} was passed but the checkpoint has no {key} state")
    if optimizer is not None:
        osd = payload["optimizer"]
        groups = osd.get("param_groups") if isinstance(osd, dict) else None
        if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
            raise ValueError("load_checkpoint: the optimizer's parameter groups differ from the checkpoint's")
        for g_saved, g in zip(groups, optimizer.param_groups):
            if not isinstance(g_saved, dict) or len(g_saved.get("params", ())) != len(g["params"]):
                raise ValueError(
                    "load_checkpoint: an optimizer parameter group has a different size than in the checkpoint"
                )
        _check_optimizer_state(osd, optimizer)
    _check_rest(payload, scheduler, state, restore_rng)
    # ---- validated: now modify (with a rollback should an object's own load_state_dict still raise) ----
    undo = []
    try:
        if optimizer is not None:
            old = copy.deepcopy(optimizer.state_dict())
            undo.append(lambda old=old: optimizer.load_state_dict(old))
            optimizer.load_state_dict(payload["optimizer"])
        with torch.no_grad():
            old_params = {n: p.detach().clone() for n, p in params.items()}

            def _restore_params(old_params=old_params):
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(old_params[n])

            undo.append(_restore_params)
            for n, p in params.items():
                p.copy_(saved[n])
        _apply_rest(payload, scheduler, state, restore_rng, undo)
    except Exception as e:
        raise _rollback(undo, path, e) from e
    return payload["extra"]


def _check_rest(payload: dict, scheduler, state, restore_rng: bool) -> None:
    if scheduler is not None:
        _check_state_dict_like(payload["scheduler"], scheduler, "scheduler")
    if state is not None:
        _check_state_dict_like(payload["state"], state, "state")
    if restore_rng:
        check_rng(payload["rng"])


def _apply_rest(payload: dict, scheduler, state, restore_rng: bool, undo: list) -> None:
    """Load the scheduler, the step state and the RNG states (each with its undo)."""
    if scheduler is not None:
        old_s = copy.deepcopy(scheduler.state_dict())
        undo.append(lambda old_s=old_s: scheduler.load_state_dict(old_s))
        scheduler.load_state_dict(payload["scheduler"])
    if state is not None:
        old_st = copy.deepcopy(state.state_dict())
        undo.append(lambda old_st=old_st: state.load_state_dict(old_st))
        state.load_state_dict(payload["state"])
    if restore_rng:
        old_rng = rng_state()
        undo.append(lambda old_rng=old_rng: set_rng_state(old_rng))
        set_rng_state(payload["rng"])


def _rollback(undo: list, path: str, e: Exception) -> ValueError:
    """Run the undo steps (best effort: an object that failed to load may also fail to restore); the error."""
    for fn in reversed(undo):
        try:
            fn()
        except Exception:  # noqa: S112 - keep restoring the others
            continue
    return ValueError(f"load_checkpoint: {path!r} could not be applied ({type(e).__name__}: {e})")


def _load_sharded(path, payload, model, optimizer, scheduler, state, restore_rng, params, model_sharded):
    """The FSDP2 branch of :func:`load_checkpoint` (collective): the shards are read into copies and verified
    before anything changes, then applied (DCP reshards them to this world size)."""
    from .checkpoint_sharded import load_shards

    descriptor = payload.get("sharded")
    if descriptor is None:
        raise ValueError(
            f"load_checkpoint: {path!r} was written by an unsharded run but the model is FSDP2-sharded; resume "
            "it without --fsdp (or start a sharded run afresh)"
        )
    if not model_sharded:
        raise ValueError(
            f"load_checkpoint: {path!r} holds FSDP2 shards but the model is not sharded; resume it with --fsdp "
            "(antibody_fast.fsdp.shard_model), on any number of ranks"
        )
    names = sorted(params)
    if descriptor.get("names") != names:
        saved = set(descriptor.get("names") or ())
        raise ValueError(
            "load_checkpoint: trainable parameters differ from the checkpoint: missing in checkpoint "
            f"{sorted(set(names) - saved)[:5]}, not trainable in the model {sorted(saved - set(names))[:5]}"
        )
    if optimizer is not None and "optimizer" not in descriptor.get("parts", ("model", "optimizer")):
        raise ValueError("load_checkpoint: an optimizer was passed but the checkpoint has no optimizer state")
    _check_rest(payload, scheduler, state, restore_rng)
    apply_shards = load_shards(path, descriptor, model, optimizer)
    undo: list = []
    try:
        anchor = apply_shards()
        if anchor is not None and isinstance(payload["state"], dict):
            payload = {**payload, "state": {**payload["state"], "anchor": anchor}}
        _apply_rest(payload, scheduler, state, restore_rng, undo)
    except Exception as e:
        raise _rollback(undo, path, e) from e
    return payload["extra"]
