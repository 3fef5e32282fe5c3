"""Where a command runs: the ``torchrun`` world, the device, the seed and the autocast dtype.

Launched with ``torchrun --nproc-per-node N``, ``align`` and ``finetune`` join the process group (NCCL on
CUDA, one GPU per local rank; gloo on CPU) and every rank starts from rank 0's trainable parameters. Only rank
0 writes (:data:`WORLD` ``.main``).
"""

from __future__ import annotations

import os

from .console import CLIError
from .loading import check_adapters, check_model_source
from .options import TrainOptions

__all__ = [
    "World",
    "WORLD",
    "resolve_device",
    "launched_world_size",
    "init_distributed",
    "sync_trainable",
    "training_device",
    "check_impl",
    "amp_dtype",
]


def resolve_device(name: str):
    """The torch device ``--device`` names (``auto``: CUDA when available, else the CPU); a device this
    machine or torch build cannot use is a :class:`~antibody_fast.cli.console.CLIError`."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        try:  # e.g. mps / xpu: usable only when this torch build supports it
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError) as e:
            raise CLIError(
                f"--device {name!r}: not usable with this torch build ({' '.join(str(e).split())})"
            ) from None
    return dev


class World:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one)."""

    def __init__(self) -> None:
        self.rank, self.size, self.owned = 0, 1, False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import gc

            import torch.distributed as dist

            # the run's DTensors (--fsdp) hold the group through their device mesh: collect them while the
            # interpreter is alive (a gloo thread released at interpreter teardown aborts: cli.exit_process)
            gc.collect()
            dist.destroy_process_group()
            self.owned = False
        self.rank, self.size = 0, 1


WORLD = World()
"""The process's world: one per process, joined by :func:`init_distributed` and left by ``WORLD.close()``."""


def launched_world_size() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it (1 without ``torchrun``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CLIError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def init_distributed(device, *, always: bool = False):
    """Join the ``torchrun`` process group when launched with several processes; returns the device to use
    (``cuda:LOCAL_RANK`` on CUDA). Single process: ``device`` unchanged, and no process group unless
    ``always`` (``--fsdp``, whose DTensors need one: a one-rank group is made then)."""
    import torch
    import torch.distributed as dist

    world = launched_world_size()
    if world <= 1 and always and not dist.is_initialized():
        import socket

        with socket.socket() as s:  # a free local port for the one-rank group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        WORLD.owned = True
        return device
    if world <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise CLIError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        WORLD.owned = True
    WORLD.rank, WORLD.size = dist.get_rank(), dist.get_world_size()
    return device


def distribute_model(model, opts: TrainOptions) -> None:
    """Every rank starts from rank 0's trainable parameters (:func:`sync_trainable`); with ``--fsdp`` the model
    is then sharded (:func:`antibody_fast.fsdp.shard_model`). Call before the optimizer is built."""
    sync_trainable(model)
    if opts.fsdp:
        from ..fsdp import shard_model

        shard_model(model)


def sync_trainable(model) -> None:
    """Every rank starts from rank 0's trainable parameters (they are equal already when every rank used the
    same seed; this makes it certain): one broadcast per flat parameter buffer (the steps' own buffers)."""
    if WORLD.size > 1:
        import torch
        import torch.distributed as dist

        from .._model import flat_parameters

        with torch.no_grad():
            for buf in flat_parameters(model).param_buffers:
                dist.broadcast(buf, src=0)


def training_device(opts: TrainOptions):
    """Checks that need no model (source, adapters), the process group under torchrun, the device, the seed."""
    import torch

    check_model_source(opts.model)
    check_adapters(opts.adapter)
    device = init_distributed(resolve_device(opts.device), always=opts.fsdp)
    check_impl(opts.impl, device)
    torch.manual_seed(opts.seed)
    return device


def check_impl(impl: str, device) -> None:
    """``--impl`` other than ``auto`` must be able to run every fused op of the steps on ``device``; else a
    :class:`~antibody_fast.cli.console.CLIError` naming the reasons, before anything is written."""
    if impl == "auto":
        return
    from .. import ops  # noqa: F401  (registers the ops)
    from ..dispatch import not_supported_reasons, registered_ops

    for op in registered_ops():
        reasons = not_supported_reasons(op, impl, device)
        if reasons:
            raise CLIError(f"--impl {impl} cannot run {op} on {device}: {'; '.join(reasons)}")


def amp_dtype(opts: TrainOptions, device):
    """The autocast dtype of ``--amp`` (``auto``: bf16 on CUDA with float32 weights, else none). Vaccine's and
    Lisa's steps have no autocast option: ``auto`` gives none for them and an explicit ``--amp bf16|fp16`` is
    an error."""
    import torch

    amp = opts.amp
    if opts.method in ("vaccine", "lisa"):
        if amp in ("bf16", "fp16"):
            raise CLIError(f"--amp {amp}: --method {opts.method} runs without autocast (use --dtype instead)")
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and opts.dtype == "float32" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
