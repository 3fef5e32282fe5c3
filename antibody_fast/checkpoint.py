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

A run stopped after step k and resumed from its checkpoint ends with the same parameters as an
uninterrupted run (tested on CPU with deterministic kernels).
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "antibody_fast.checkpoint/1"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DistributedDataParallel / DataParallel keep the real model in .module; parameter names differ by
    # the "module." prefix, which we never store.
    while isinstance(
        model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    ):  # pragma: no cover - DDP wrap
        model = model.module
    return model


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in _unwrap(model).named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    v, internal, gauss = random.getstate()
    state["python"] = [v, list(internal), gauss]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            return
        s = state["numpy"]
        np.random.set_state(  # noqa: NPY002 - restoring the legacy global RNG is the point
            (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
        )


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: Any = None,
    extra: dict | None = None,
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
    """
    params = _trainable(model)
    if not params:
        raise ValueError("save_checkpoint: the model has no trainable parameters (requires_grad=True)")
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "params": {n: p.detach().to("cpu", copy=True) for n, p in params.items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "state": state.state_dict() if state is not None else None,
        "rng": _rng_state(),
        "extra": extra,
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"save_checkpoint: directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable; not every platform can open a directory
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)


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
    return payload


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: Any = None,
    *,
    restore_rng: bool = True,
) -> dict | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``extra`` dict.

    The trainable parameters are copied **in place** (``param.copy_``), so parameter objects, optimizer
    references and :class:`~antibody_fast.flat.FlatParameters` views stay valid. Everything is validated
    before anything is modified: a missing file raises ``FileNotFoundError``; a corrupt file, different
    trainable parameter names/shapes/dtypes, a missing optimizer/scheduler/state entry that was asked for,
    or an optimizer with a different parameter-group layout raise ``ValueError``; in all these cases the
    model, optimizer, scheduler and state are unchanged.
    """
    path = os.fspath(path)
    payload = _read(path)
    params = _trainable(model)
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
            if len(g_saved.get("params", ())) != len(g["params"]):
                raise ValueError(
                    "load_checkpoint: an optimizer parameter group has a different size than in the checkpoint"
                )
    # ---- validated: now modify ----
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if state is not None:
        state.load_state_dict(payload["state"])
    if restore_rng:
        _set_rng_state(payload["rng"])
    return payload["extra"]
