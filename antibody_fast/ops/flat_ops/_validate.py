"""Input checks of the flat-buffer ops (shared by the public API and the references). Only metadata is
inspected: no check synchronises with the host, and every one raises before anything is written."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FlatTensors = torch.Tensor | Sequence[torch.Tensor]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_list(x: FlatTensors, what: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        xs = [x]
    elif isinstance(x, (list, tuple)):
        xs = list(x)
    else:
        raise TypeError(f"{what}: expected a Tensor or a list of Tensors, got {type(x).__name__}")
    if not xs:
        raise ValueError(f"{what}: empty list of flat tensors")
    for i, t in enumerate(xs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}]: expected a Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{what}[{i}]: dtype {t.dtype} is not supported (float32/float16/bfloat16/float64)"
            )
        if t.dim() != 1:
            raise ValueError(f"{what}[{i}]: expected a 1-D flat tensor, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{what}[{i}]: flat tensors must be contiguous")
        if t.layout != torch.strided:
            raise ValueError(f"{what}[{i}]: layout {t.layout} is not supported (dense tensors only)")
    dev = xs[0].device
    for i, t in enumerate(xs):
        if t.device != dev:
            raise ValueError(
                f"{what}: all flat tensors must be on one device, got {dev} and {t.device} (index {i})"
            )
    return xs


def check_like(ref: list[torch.Tensor], other: list[torch.Tensor], ref_name: str, name: str) -> None:
    if len(other) != len(ref):
        raise ValueError(f"{name}: {len(other)} flat tensors but {ref_name} has {len(ref)}")
    for i, (r, o) in enumerate(zip(ref, other)):
        if o.numel() != r.numel():
            raise ValueError(
                f"{name}[{i}]: numel {o.numel()} does not match {ref_name}[{i}] numel {r.numel()}"
            )
        if o.dtype != r.dtype:
            raise ValueError(f"{name}[{i}]: dtype {o.dtype} does not match {ref_name}[{i}] dtype {r.dtype}")
        if o.device != r.device:
            raise ValueError(
                f"{name}[{i}]: device {o.device} does not match {ref_name}[{i}] device {r.device}"
            )


def check_no_grad(xs: list[torch.Tensor], name: str) -> None:
    for i, t in enumerate(xs):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name}[{i}] requires grad: in-place flat ops need plain buffers (use FlatParameters.params, "
                "or run under torch.no_grad())"
            )


def scalar_arg(value, name: str, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """A python number -> (None, value); a 0-dim/1-element tensor on ``device`` -> (tensor, 0.0)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name}: expected a python float or a 1-element tensor, got shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"{name}: tensor on {value.device} but the flat buffers are on {device}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: unsupported dtype {value.dtype}")
        return value.detach().reshape(()), 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a python float or a tensor, got {type(value).__name__}")
    return None, float(value)
