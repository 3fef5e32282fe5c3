"""The sharded half of a checkpoint of an FSDP2 run: trainable weights and optimizer state written by every rank
with ``torch.distributed.checkpoint`` (DCP), next to the small checkpoint file rank 0 writes
(:mod:`antibody_fast.checkpoint`: scheduler, λ EMA / step state, RNG, position, fingerprint, checksum).

Layout: ``<checkpoint>.shards-<id>/`` (one DCP directory per save; ``id`` is fresh each time and recorded in the
checkpoint file). A save writes the new directory first and the checkpoint file last, then deletes the older
directories, so a crash at any point leaves a checkpoint file whose directory is complete. The checkpoint file
records the SHA-256 of every file of its directory, verified on load.

DCP reshards on load: a run saved on N ranks resumes on M ranks (the data order decides whether that is
allowed; the command line checks the global batch). Every function here is collective: every rank of the
default process group calls it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import uuid
from typing import Any

import torch

__all__ = ["SHARDS_SUFFIX", "load_shards", "remove_old_shards", "save_shards", "shard_state"]

SHARDS_SUFFIX = ".shards-"


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a sharded (FSDP2) checkpoint needs torch.distributed to be initialised")
    return dist


def _options(strict: bool = True):
    """Trainable entries only; loading is not strict because the frozen base weights are not in the checkpoint
    (the trainable names were checked against the checkpoint's record before)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def shard_state(model, optimizer, anchor: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """The DCP state (DTensors): trainable weights, optimizer state and, given ``anchor`` (one tensor per local shard, laid
    out like ``FlatParameters.param_buffers``: Lisa's), the anchor as DTensors sharded like the parameters."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [], options=_options())
    out = {"model": msd}
    if optimizer is not None:
        out["optimizer"] = osd
    if anchor is not None:
        out["anchor"] = _anchor_dtensors(model, anchor)
    return out


def _anchor_dtensors(model, anchor: list[torch.Tensor]) -> dict[str, Any]:
    from ._model import flat_parameters
    from .distributed import dtensor_like

    flat = flat_parameters(model)
    if len(anchor) != len(flat.parameters):
        raise ValueError(
            f"the anchor has {len(anchor)} tensors but the model {len(flat.parameters)} trainable ones"
        )
    return {name: dtensor_like(a, p) for name, p, a in zip(flat.names, flat.parameters, anchor)}


def _hash_files(directory: str) -> dict[str, str]:
    out = {}
    for f in sorted(os.listdir(directory)):
        h = hashlib.sha256()
        with open(os.path.join(directory, f), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[f] = h.hexdigest()
    return out


def save_shards(path: str, model, optimizer, anchor: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Write the trainable weights, the optimizer state and (given) Lisa's ``anchor`` of an FSDP2 model into a
    fresh ``<path>.shards-<id>/`` (collective). Returns the descriptor the checkpoint file stores:
    ``{"dir": basename, "world_size": int, "files": {name: sha256}, "parts": [...]}`` (the same on every
    rank)."""
    import torch.distributed.checkpoint as dcp

    dist = _dist()
    token = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    directory = f"{path}{SHARDS_SUFFIX}{token[0]}"
    dcp.save(shard_state(model, optimizer, anchor), checkpoint_id=directory)
    dist.barrier()  # every rank's files are written
    files = [_hash_files(directory) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(files, src=0)
    return {
        "dir": os.path.basename(directory),
        "world_size": dist.get_world_size(),
        "files": files[0],
        "names": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "parts": ["model"]
        + (["optimizer"] if optimizer is not None else [])
        + (["anchor"] if anchor else []),
    }


def remove_old_shards(path: str, keep: str) -> None:
    """Rank 0, after the checkpoint file naming ``keep`` is in place: delete the other shard directories."""
    for d in glob.glob(glob.escape(path) + SHARDS_SUFFIX + "*"):
        if os.path.basename(d) != keep:
            shutil.rmtree(d, ignore_errors=True)


def load_shards(path: str, descriptor: Any, model, optimizer):
    """Read and verify the shards a checkpoint file names, **without** changing the model or optimizer
    (collective). Returns ``apply()``, which loads them into the model and the optimizer (DCP reshards to this
    world size) and returns Lisa's anchor for this rank's shards (a list laid out like
    ``FlatParameters.param_buffers``), or None when the checkpoint has none. Raises ``ValueError`` for a missing
    or changed file, or weights / state that do not fit."""
    import torch.distributed.checkpoint as dcp

    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("files"), dict):
        raise ValueError(f"load_checkpoint: {path!r} has a corrupt 'sharded' entry")
    directory = os.path.join(os.path.dirname(os.path.abspath(path)), str(descriptor.get("dir")))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_checkpoint: the shard directory {directory!r} of {path!r} is missing")
    found = _hash_files(directory)
    if found != descriptor["files"]:
        recorded = descriptor["files"]
        changed = sorted(set(found) ^ set(recorded) | {k for k in found if found[k] != recorded.get(k)})
        raise ValueError(
            f"load_checkpoint: the shards in {directory!r} do not match the checkpoint's record (changed or "
            f"missing: {', '.join(changed[:5])})"
        )
    anchor = None
    if "anchor" in descriptor.get("parts", ()):
        from ._model import flat_parameters

        anchor = [torch.zeros_like(t) for t in flat_parameters(model).param_buffers]
    if optimizer is not None and not optimizer.state:
        # DCP creates an empty optimizer's state (a zero-lr step on zero gradients) only when no parameter has a
        # gradient; the flat gradient views may be attached already. They are re-attached by the next step.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
    target = _clone(
        shard_state(model, optimizer, anchor)
    )  # loaded into copies: nothing changes unless all loads
    if (
        optimizer is not None
        and "optimizer" in descriptor.get("parts", ())
        and not target["optimizer"].get("state")
    ):
        raise ValueError(
            f"load_checkpoint: the optimizer's state could not be set up to load {directory!r} into"
        )
    try:
        dcp.load(target, checkpoint_id=directory)
    except Exception as e:
        raise ValueError(
            f"load_checkpoint: the shards in {directory!r} do not fit this model / optimizer ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]})"
        ) from e

    def apply() -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            model,
            optimizer if optimizer is not None else [],
            model_state_dict=target["model"],
            optim_state_dict=target.get("optimizer", {}),
            options=_options(strict=False),
        )
        if "anchor" not in target:
            return None
        return [t.to_local().reshape(-1).clone() for t in target["anchor"].values()]

    return apply


def _clone(obj: Any) -> Any:
    """A copy of a nested state dict whose tensors (DTensors included) are fresh copies."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj
