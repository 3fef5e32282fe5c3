"""All trainable parameters as views into one contiguous buffer per dtype (docs/design.md §3).

:class:`FlatParameters` packs every ``requires_grad`` parameter of a model (or of an iterable of
parameters) into one flat buffer per dtype: each parameter's ``.data`` becomes a view of its buffer and its
``.grad`` a view of a matching flat gradient buffer, so that backward accumulates straight into the flat
gradient and the fused ops of :mod:`antibody_fast.ops.flat_ops` work on the whole parameter set in one or
two launches.

The Parameter objects stay the same (optimizers built before or after packing keep working, and
``state_dict``/``load_state_dict`` are unaffected: ``load_state_dict`` copies in place into the views).

Gradient views and ``zero_grad``
    Autograd accumulates *in place* into an existing ``.grad`` of matching shape/dtype, so the views stay
    attached through any number of backward passes (not with ``create_graph=True``: autograd then replaces
    ``.grad`` out of place). ``optimizer.zero_grad()`` (``set_to_none=True`` by
    default) or ``model.zero_grad()`` replace ``.grad`` by None, and the next backward then allocates fresh,
    detached gradients. Use :meth:`FlatParameters.zero_grad` instead, or call
    :meth:`FlatParameters.ensure_grad_views` before backward (or after it: any detached ``.grad`` is copied
    into the flat buffer and the view re-attached; a None grad reads as zero).

Things that break the views: ``model.to(...)``/``model.half()`` after packing (they replace ``param.data``).
:meth:`FlatParameters.is_stale` detects it in O(1) per dtype group (a cached fingerprint: the ``data_ptr``,
dtype and device of the first and last parameter of each group); :func:`antibody_fast.steps.flat_parameters`
then re-packs automatically, and :meth:`~FlatParameters.perturbed`, :meth:`~FlatParameters.zero_grad` and
:meth:`~FlatParameters.ensure_grad_views` raise :class:`StaleFlatParametersError` instead of silently working
on buffers that no longer back the parameters (docs/reliability.md). ``torch.save`` of a view stores its whole storage (the flat buffer, once per file);
clone the tensors first if a per-tensor file is wanted.

Multiple dtypes
    One :class:`FlatGroup` per dtype (in order of first appearance). ``.params``/``.grads`` return the flat
    tensor when there is exactly one group and raise otherwise; ``.param_buffers``/``.grad_buffers`` always
    return the list (one tensor per group) and every op of :mod:`antibody_fast.ops.flat_ops` accepts such a
    list (norms and dot products are then global over all groups).

Sharded parameters (FSDP2)
    When the trainable parameters are DTensors (``fully_shard``, see :mod:`antibody_fast.fsdp`), nothing is
    re-pointed: FSDP2 owns each parameter's local shard (it all-gathers from that storage). Then
    :attr:`~FlatParameters.param_buffers` is one 1-D view of each parameter's *local shard* (a fresh list at every
    access, so it follows FSDP2 when its lazy init re-pads a shard) and :attr:`~FlatParameters.grad_buffers` is
    laid out the same way: one view per parameter into a flat gradient buffer per dtype, attached to each
    parameter as a DTensor ``.grad``. FSDP2's reduce-scatter adds into an existing ``.grad`` in place, so the
    flat gradient receives the already-reduced local shard of the global gradient and no second all-reduce is
    needed (the DDP path instead all-reduces the full flat gradient, see
    :func:`antibody_fast.steps.reduce_grads`). Norms and dot products over these lists are local partial sums:
    pass ``group=flat.shard_group`` to the flat ops (the steps do) for the global value. The layout is per
    parameter, so a flat op is one launch per parameter there instead of one per dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .distributed import dtensor_like, local_tensor, shard_group
from .ops.flat_ops import PerturbBackup, perturb_, restore_


class StaleFlatParametersError(RuntimeError):
    """The flat buffers no longer back the parameters (``model.to(...)``/``.half()`` after packing)."""


@dataclass
class FlatGroup:
    """The parameters of one dtype.

    Attributes:
        dtype: the dtype of every parameter of the group.
        params: flat parameter buffer ``[numel]`` (``dtype``); each parameter's ``.data`` is a view of it.
        grads: flat gradient buffer ``[numel]`` (``dtype``); each parameter's ``.grad`` is a view of it.
        names: parameter names, in buffer order.
        offsets: start of each parameter in the buffer.
        shapes: shape of each parameter.
        numel: total number of elements of the group.
    """

    dtype: torch.dtype
    params: torch.Tensor
    grads: torch.Tensor
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)
    parameters: list[torch.nn.Parameter] = field(default_factory=list, repr=False)
    grad_views: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def numel(self) -> int:
        return self.params.numel()


def _collect(model_or_params) -> list[tuple[str, torch.nn.Parameter]]:
    if isinstance(model_or_params, torch.nn.Module):
        named = list(model_or_params.named_parameters())  # deduplicates shared parameters
    elif isinstance(model_or_params, torch.Tensor):
        raise TypeError("FlatParameters: pass a module or an iterable of parameters, not a single tensor")
    elif isinstance(model_or_params, Iterable):
        named = []
        seen_names = set()
        for i, item in enumerate(model_or_params):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, p = item
            else:
                name, p = f"param{i}", item
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"FlatParameters: item {i} is {type(p).__name__}, expected a Parameter")
            if name in seen_names:
                raise ValueError(f"FlatParameters: duplicate parameter name {name!r}")
            seen_names.add(name)
            named.append((name, p))
    else:
        raise TypeError(
            f"FlatParameters: expected an nn.Module or an iterable of parameters, got "
            f"{type(model_or_params).__name__}"
        )
    out, seen = [], set()
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        out.append((name, p))
    return out


def _by_dtype(
    named: list[tuple[str, torch.nn.Parameter]],
) -> dict[torch.dtype, list[tuple[str, torch.nn.Parameter]]]:
    """The ``(name, parameter)`` pairs grouped by dtype, in order of first appearance."""
    out: dict[torch.dtype, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in named:
        out.setdefault(p.dtype, []).append((name, p))
    return out


class FlatParameters:
    """Pack the trainable parameters of ``model_or_params`` into one flat buffer per dtype.

    Args:
        model_or_params: an ``nn.Module`` (its ``requires_grad`` parameters, in ``named_parameters`` order)
            or an iterable of Parameters or of ``(name, Parameter)`` pairs (frozen ones are skipped).

    Raises:
        ValueError: no trainable parameter; parameters on different devices; sparse or non-strided
            parameters. Nothing is modified when an error is raised.

    Existing ``.grad`` values are copied into the flat gradient buffer (missing ones read as zero).
    """

    def __init__(self, model_or_params):
        named = _collect(model_or_params)
        if not named:
            raise ValueError("FlatParameters: no trainable parameters (nothing has requires_grad=True)")
        device = named[0][1].device
        for name, p in named:
            if p.device != device:
                raise ValueError(
                    f"FlatParameters: parameters on different devices: {named[0][0]!r} on {device}, "
                    f"{name!r} on {p.device}"
                )
            if p.layout != torch.strided or p.is_sparse:
                raise ValueError(
                    f"FlatParameters: parameter {name!r} has layout {p.layout}; only dense ones pack"
                )
            if not p.is_floating_point():
                raise ValueError(f"FlatParameters: parameter {name!r} has non-float dtype {p.dtype}")
            if p.grad is not None and (p.grad.shape != p.shape or p.grad.layout != torch.strided):
                raise ValueError(
                    f"FlatParameters: parameter {name!r} has a .grad of shape {tuple(p.grad.shape)} "
                    f"/ layout {p.grad.layout}"
                )
        self.shard_group = shard_group(p for _, p in named)  # validates a sharded layout; None when unsharded
        self.sharded = self.shard_group is not None
        self.device = device
        if self.sharded:
            self._init_sharded(named)
            return
        by_dtype = _by_dtype(named)
        self.groups: list[FlatGroup] = []
        with torch.no_grad():
            for dtype, items in by_dtype.items():
                total = sum(p.numel() for _, p in items)
                pbuf = torch.empty(total, dtype=dtype, device=device)
                gbuf = torch.zeros(total, dtype=dtype, device=device)
                grp = FlatGroup(dtype=dtype, params=pbuf, grads=gbuf)
                off = 0
                for name, p in items:
                    n = p.numel()
                    pbuf[off : off + n].copy_(p.detach().reshape(-1))
                    if p.grad is not None:
                        gbuf[off : off + n].copy_(p.grad.detach().reshape(-1))
                    grp.names.append(name)
                    grp.offsets.append(off)
                    grp.shapes.append(p.shape)
                    grp.parameters.append(p)
                    grp.grad_views.append(gbuf[off : off + n].view(p.shape))
                    off += n
                self.groups.append(grp)
            # Only now (all copies done) re-point the parameters at the buffers.
            for grp in self.groups:
                for p, off, shape, gv in zip(grp.parameters, grp.offsets, grp.shapes, grp.grad_views):
                    p.data = grp.params[off : off + p.numel()].view(shape)
                    p.grad = gv
        self._finish_init()

    def _finish_init(self) -> None:
        self._backup: list[torch.Tensor] | None = None
        self._in_perturbed = False
        self._fingerprint = self._current_fingerprint(expected=True)

    def _init_sharded(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        """FSDP2 layout (module docstring): one flat gradient buffer per dtype over the local shards, attached to
        each parameter as a DTensor ``.grad``; the parameters keep their own storage."""
        by_dtype = _by_dtype(named)
        self.groups = []
        self._grad_list: list[torch.Tensor] = []
        with torch.no_grad():
            for dtype, items in by_dtype.items():
                locals_ = [local_tensor(p) for _, p in items]
                gbuf = torch.zeros(sum(t.numel() for t in locals_), dtype=dtype, device=self.device)
                grp = FlatGroup(dtype=dtype, params=gbuf.new_empty(0), grads=gbuf)
                off = 0
                for (name, p), loc in zip(items, locals_):
                    n = loc.numel()
                    view = gbuf[off : off + n]
                    if p.grad is not None:
                        view.copy_(local_tensor(p.grad).reshape(-1))
                    grp.names.append(name)
                    grp.offsets.append(off)
                    grp.shapes.append(loc.shape)  # the local shard's shape
                    grp.parameters.append(p)
                    grp.grad_views.append(dtensor_like(view, p))
                    self._grad_list.append(view)
                    off += n
                self.groups.append(grp)
            for grp in self.groups:
                for p, gv in zip(grp.parameters, grp.grad_views):
                    p.grad = gv
        self._finish_init()

    # ---------------------------------------------------------------- staleness
    def _current_fingerprint(self, expected: bool = False) -> tuple:
        """``(data_ptr, dtype, device)`` of the first and last parameter of each group: as packed
        (``expected``: computed from the buffers) or as the parameters are now."""
        out = []
        # FSDP2 owns the storage (param_buffers are fresh views): only the dtype or the device can go stale
        if self.sharded:
            return tuple(
                (p.dtype, p.device) for g in self.groups for p in (g.parameters[0], g.parameters[-1])
            )
        for g in self.groups:
            for i in (0, len(g.parameters) - 1):
                if expected:
                    ptr = g.params.data_ptr() + g.offsets[i] * g.params.element_size()
                    out.append((ptr, g.dtype, g.params.device))
                else:
                    p = g.parameters[i]
                    out.append((p.data_ptr(), p.dtype, p.device))
        return tuple(out)

    def is_stale(self) -> bool:
        """True when the parameters no longer live in the flat buffers (``model.to(dtype/device)``,
        ``model.half()``, ``param.data = ...`` on the first or last parameter of a group). O(number of dtype
        groups), host-only, no sync."""
        return self._current_fingerprint() != self._fingerprint

    def _check_fresh(self, what: str) -> None:
        if self.is_stale():
            raise StaleFlatParametersError(
                f"FlatParameters.{what}: the parameters no longer live in the flat buffers (model.to(...), "
                ".half() or .cuda() after packing replaced param.data); re-pack with FlatParameters(model) "
                "(antibody_fast.steps.flat_parameters(model) does it automatically)"
            )

    # ---------------------------------------------------------------- buffers
    def _single(self, what: str) -> FlatGroup:
        if len(self.groups) != 1:
            dts = ", ".join(str(g.dtype) for g in self.groups)
            raise ValueError(
                f"FlatParameters.{what}: the trainable parameters have {len(self.groups)} dtypes ({dts}), so there "
                f"is one flat buffer per dtype: use .{what[:-1]}_buffers (a list, accepted by every flat op) or "
                ".groups"
            )
        return self.groups[0]

    @property
    def params(self) -> torch.Tensor:
        """The flat parameter buffer ``[numel]`` (single-dtype, unsharded models only; see ``param_buffers``)."""
        if self.sharded:
            raise ValueError(
                "FlatParameters.params: the parameters are FSDP2 shards, which keep their own storage; use "
                ".param_buffers (one view per local shard, accepted by every flat op)"
            )
        return self._single("params").params

    @property
    def grads(self) -> torch.Tensor:
        """The flat gradient buffer ``[numel]`` (single-dtype models only; see ``grad_buffers``)."""
        return self._single("grads").grads

    @property
    def param_buffers(self) -> list[torch.Tensor]:
        """One flat parameter buffer per dtype group; sharded (FSDP2): one 1-D view of each parameter's local
        shard, in :attr:`names` order (taken afresh at each access)."""
        if self.sharded:
            return [local_tensor(p).view(-1) for p in self.parameters]
        return [g.params for g in self.groups]

    @property
    def grad_buffers(self) -> list[torch.Tensor]:
        """One flat gradient buffer per dtype group; sharded (FSDP2): one view per parameter, laid out like
        :attr:`param_buffers`."""
        if self.sharded:
            return list(self._grad_list)
        return [g.grads for g in self.groups]

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g.names]

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g.parameters]

    @property
    def numel(self) -> int:
        """Number of elements this process holds (its local shards when sharded)."""
        return sum(g.grads.numel() for g in self.groups)

    @property
    def dtypes(self) -> list[torch.dtype]:
        return [g.dtype for g in self.groups]

    def layout(self) -> dict[str, tuple[int, int, torch.Size]]:
        """``{name: (group index, offset, shape)}``."""
        return {
            n: (gi, off, shape)
            for gi, g in enumerate(self.groups)
            for n, off, shape in zip(g.names, g.offsets, g.shapes)
        }

    def unflatten(self, flat: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Views ``{name: tensor of the parameter's shape}`` into flat tensor(s) laid out like the buffers."""
        flats = [flat] if isinstance(flat, torch.Tensor) else list(flat)
        if self.sharded:  # laid out like param_buffers: one tensor per parameter (local shard)
            shapes = [s for g in self.groups for s in g.shapes]
            if len(flats) != len(shapes) or any(f.numel() != s.numel() for f, s in zip(flats, shapes)):
                raise ValueError("FlatParameters.unflatten: the tensors do not match the local shards")
            return {n: f.view(s) for n, f, s in zip(self.names, flats, shapes)}
        if len(flats) != len(self.groups) or any(f.numel() != g.numel for f, g in zip(flats, self.groups)):
            raise ValueError("FlatParameters.unflatten: the flat tensors do not match the group numels")
        return {
            n: f[off : off + s.numel()].view(s)
            for f, g in zip(flats, self.groups)
            for n, off, s in zip(g.names, g.offsets, g.shapes)
        }

    def __len__(self) -> int:
        return sum(len(g.parameters) for g in self.groups)

    def __repr__(self) -> str:
        gs = ", ".join(f"{g.dtype}: {len(g.parameters)} tensors / {g.numel} elements" for g in self.groups)
        return f"FlatParameters({gs}; device={self.device})"

    # ---------------------------------------------------------------- gradients
    def grads_attached(self) -> bool:
        """True when every parameter's ``.grad`` is its view of the flat gradient buffer (host-only check)."""
        return all(p.grad is gv for g in self.groups for p, gv in zip(g.parameters, g.grad_views))

    def ensure_grad_views(self) -> None:
        """Re-attach the flat-gradient views after something replaced ``.grad``.

        For each parameter whose ``.grad`` is not its view: a None grad zeroes its slice; any other tensor
        is copied into its slice. Then ``.grad`` is set to the view. Cheap when nothing changed (identity
        checks only); no host sync. Raises :class:`StaleFlatParametersError` when the buffers are stale.
        """
        self._check_fresh("ensure_grad_views")
        with torch.no_grad():
            for g in self.groups:
                for p, gv in zip(g.parameters, g.grad_views):
                    cur = p.grad
                    if cur is gv:
                        continue
                    dst, src = local_tensor(gv), None if cur is None else local_tensor(cur)
                    if src is None:
                        dst.zero_()
                    elif src.data_ptr() != dst.data_ptr() or src.stride() != dst.stride():
                        dst.copy_(src)
                    p.grad = gv

    def zero_grad(self) -> None:
        """Zero the flat gradient buffers (one fill per dtype) and (re-)attach every ``.grad`` view.
        Raises :class:`StaleFlatParametersError` when the buffers are stale."""
        self._check_fresh("zero_grad")
        for g in self.groups:
            g.grads.zero_()
            for p, gv in zip(g.parameters, g.grad_views):
                if p.grad is not gv:
                    p.grad = gv

    def grad_snapshot(self) -> list[torch.Tensor]:
        """Clone of the flat gradient buffers: a list laid out like :attr:`grad_buffers` (one ``[numel]`` tensor
        per dtype group; per local shard when sharded).

        Call :meth:`ensure_grad_views` first if something may have replaced ``.grad``.
        """
        return [t.clone() for t in self.grad_buffers]

    # ---------------------------------------------------------------- perturbation
    @contextlib.contextmanager
    def perturbed(
        self,
        g: torch.Tensor | list[torch.Tensor],
        rho: float,
        eps: float = 1e-7,
        *,
        group=None,
        impl: str = "auto",
    ) -> Iterator[PerturbBackup]:
        """Context manager: ``theta <- theta - rho*g/(||g||+eps)`` inside, theta restored bit for bit on exit.

        The restore runs even when the body raises. ``g`` is a flat tensor (single group) or a list laid
        out like :attr:`grad_buffers` (e.g. from :meth:`grad_snapshot`). Yields the
        :class:`~antibody_fast.ops.flat_ops.PerturbBackup` (``.norm`` and the ``.nonfinite`` device flag).
        The backup buffers are allocated once and reused across calls. Not re-entrant. Sharded (FSDP2): ``g`` is
        laid out like :attr:`grad_buffers`, each rank moves its own shards and ``||g||`` is all-reduced over
        ``group`` (default :attr:`shard_group`).
        """
        if group is None:
            group = self.shard_group
        if self._in_perturbed:
            raise RuntimeError("FlatParameters.perturbed is not re-entrant (theta is already perturbed)")
        self._check_fresh("perturbed")
        theta = self.param_buffers  # the same views for the perturbation and the restore
        if self._backup is None or [b.numel() for b in self._backup] != [t.numel() for t in theta]:
            self._backup = [torch.empty_like(b) for b in theta]
        backup = perturb_(theta, g, rho, eps, group=group, out=self._backup, impl=impl)
        self._in_perturbed = True
        try:
            yield backup
        finally:
            self._in_perturbed = False
            restore_(theta, backup, impl=impl)
