"""Small ``torch.distributed`` helpers used by the training steps.

Every helper is a no-op (returns its input, or the trivial answer) when ``torch.distributed`` is not
available or not initialised, so single-process code calls them unconditionally.

The fine-tuning step needs the softmax weights over the **global** batch and a global loss denominator.
It computes them with two fixed-size all-reduces (the global max and the global sum of ``exp``), which
allow unequal per-rank batch sizes and need no host synchronisation; :func:`all_gather_variable` is the
general (host-synchronising) tool for gathering unequal-size tensors, e.g. per-sample statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "all_reduce_sum",
    "all_reduce_max",
    "all_gather_variable",
    "all_ranks_true",
    "dtensor_like",
    "is_dtensor",
    "local_tensor",
    "shard_group",
]


def is_distributed(group=None) -> bool:
    """True when ``torch.distributed`` is initialised and the group has more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def get_rank(group=None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def get_world_size(group=None) -> int:
    """Number of ranks in ``group`` (1 when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` (any shape, floating or integer) over the ranks of ``group``, **in place**.

    Returns ``t`` (the same tensor object) for chaining; a no-op when not distributed.
    """
    if is_distributed(group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise maximum of ``t`` over the ranks of ``group``, **in place**; returns ``t``."""
    if is_distributed(group):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def all_gather_variable(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``t`` along dim 0 over the ranks of ``group`` in rank order; sizes may differ.

    ``t``: ``[n_rank, *rest]`` (``rest`` must agree over ranks, ``n_rank`` may differ, zero included).
    Returns ``[sum_r n_r, *rest]`` with the same dtype and device (``t`` itself when not distributed).

    The per-rank sizes are exchanged first (one small all-gather whose result is read on the host: this
    helper synchronises), then every rank pads to the largest size, all-gathers, and drops the padding.
    """
    if not is_distributed(group):
        return t
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes_host = [int(s) for s in torch.cat(sizes).cpu().tolist()]
    n_max = max(sizes_host)
    padded = t.new_zeros((n_max, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_host)], dim=0)


# ---------------------------------------------------------------------------------- sharded (FSDP2) tensors
def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters, gradients and optimizer
    state); checked without importing the DTensor package when it was never loaded."""
    import sys

    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor FSDP2 all-gathers from, so in-place writes to it are writes to
    the parameter), or ``t`` itself for a plain tensor. Never a copy; no autograd link."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def dtensor_like(local: torch.Tensor, param) -> torch.Tensor:
    """A DTensor over ``local`` (this rank's shard, any shape with the shard's numel: it is viewed as the shard's
    shape) with the mesh, placements, global shape and stride of the DTensor ``param``; no copy, no
    communication."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local.view(local_tensor(param).shape),
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def shard_group(params) -> object | None:
    """The process group over which the DTensor ``params`` are sharded (FSDP2: one 1-D device mesh, each
    tensor ``Shard(0)``), or ``None`` when none of them is a DTensor.

    Raises ``ValueError`` for a mix of DTensors and plain tensors, for several meshes, for a mesh of more than
    one dimension (HSDP) and for any placement other than ``Shard(0)``: the flat ops' global norms would be
    wrong for those layouts."""
    params = list(params)
    dts = [p for p in params if is_dtensor(p)]
    if not dts:
        return None
    if len(dts) != len(params):
        raise ValueError(
            f"{len(dts)} of the {len(params)} trainable parameters are DTensors (sharded) and the others are not: "
            "shard every trainable parameter with fully_shard (antibody_fast.fsdp.shard_model does it), or none"
        )
    from torch.distributed.tensor import Shard

    mesh = dts[0].device_mesh
    for p in dts:
        if p.device_mesh != mesh:
            raise ValueError(
                "the trainable DTensors live on different device meshes; one FSDP2 mesh is supported"
            )
        if tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"a trainable DTensor has placements {tuple(p.placements)}; only FSDP2's (Shard(0),) on a 1-D mesh "
                "is supported (not HSDP nor tensor parallelism)"
            )
    return mesh.get_group()


def all_ranks_true(flag: torch.Tensor, group=None) -> torch.Tensor:
    """0-dim bool: ``flag`` (0-dim bool) is true on every rank of ``group``; ``flag`` itself when not
    distributed. One all-reduce of an int32 (MIN), no host sync."""
    if not is_distributed(group):
        return flag
    v = flag.to(torch.int32)
    dist.all_reduce(v, op=dist.ReduceOp.MIN, group=group)
    return v.to(torch.bool)
