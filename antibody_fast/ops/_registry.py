"""The one way an op stage becomes a ``torch.library`` custom op (docs/design.md §4).

:func:`define_op` registers ``torch.ops.antibody_fast.<name>`` from a schema string and a table
``{impl: function}``; no op writes an ``if impl == ...`` ladder. The schema lists every argument flat (a schema
cannot hold a dataclass) and ends with ``str impl``, the implementation that
:func:`antibody_fast.dispatch.resolve_impl` picked. When the op runs, its kernel

1. checks that ``impl`` can run on the inputs' device (``triton`` on CPU tensors only under
   ``TRITON_INTERPRET=1``; ``cpp`` on CPU tensors only);
2. builds the stage's params dataclass from the schema's non-tensor arguments, matched by name;
3. returns ``impls[impl](*tensor_arguments, params)``: the tensor arguments (``Tensor``, ``Tensor?``,
   ``Tensor[]``) in schema order, then the params (left out when the schema has no other argument).

The arguments a schema marks as written (``Tensor(a!)``) are the op's ``mutates_args``. The fake kernel and the
autograd functions receive the flat schema arguments, as ``torch.library`` passes them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch

from ..dispatch import triton_interpret

NAMESPACE = "antibody_fast"

# impl -> (can it run on this device, the error otherwise); the public API resolved the impl already, so
# only a direct call of ``torch.ops.antibody_fast.*`` can fail here
_DEVICE_RULES: dict[str, tuple[Callable[[torch.device], bool], str]] = {
    "triton": (
        lambda d: d.type != "cpu" or triton_interpret(),
        "impl='triton' on CPU tensors needs TRITON_INTERPRET=1",
    ),
    "cpp": (lambda d: d.type == "cpu", "impl='cpp' runs on CPU tensors only"),
}


@dataclasses.dataclass(frozen=True)
class _Arg:
    name: str
    is_tensor: bool
    is_written: bool


def _schema_args(name: str, schema: str) -> list[_Arg]:
    m = re.match(r"\((.*?)\) ->", schema)
    if m is None:
        raise ValueError(f"{name}: schema {schema!r} is not '(arguments) -> returns'")
    args = []
    for part in m.group(1).split(","):
        typ, arg = part.strip().rsplit(" ", 1)
        args.append(_Arg(arg, typ.startswith("Tensor"), "!" in typ))
    if not args or args[-1].name != "impl" or args[-1].is_tensor:
        raise ValueError(f"{name}: the schema's last argument must be 'str impl'")
    return args[:-1]


def _device(args) -> torch.device:
    """Device of the first tensor argument (a tensor, or the first member of a tensor list)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    return torch.device("cpu")


def impls_named(name: str, modules: Mapping[str, ModuleType]) -> dict[str, Callable[..., Any]]:
    """The table ``{impl: function}`` of one op stage: the function called ``name`` in each implementation's
    module (``{"cpp": _cpp, "triton": _triton, "torch": _torch}``): one name per op in every layer."""
    return {impl: getattr(module, name) for impl, module in modules.items()}


def define_op(
    name: str,
    schema: str,
    impls: Mapping[str, Callable[..., Any]],
    *,
    fake: Callable[..., Any],
    params: type | None = None,
    backward: Callable[..., Any] | None = None,
    setup_context: Callable[..., Any] | None = None,
) -> torch.library.CustomOpDef:
    """Register ``torch.ops.antibody_fast.<name>`` (see the module docstring) and return it.

    Args:
        name: the op's name, one per op in every layer (``kernels/``, ``csrc/``, Python).
        schema: ``"(Tensor x, ..., float rho, str impl) -> Tensor"``.
        impls: ``{"cpp": f, "triton": f, "torch": f}``, each ``f(*tensor_args[, params])``.
        fake: the fake (meta) kernel, on the flat schema arguments.
        params: a dataclass whose fields are exactly the schema's non-tensor arguments other than ``impl``;
            None when there are none.
        backward, setup_context: as :func:`torch.library.register_autograd` (both or neither).
    """
    args = _schema_args(name, schema)
    scalars = [a.name for a in args if not a.is_tensor]
    fields = [f.name for f in dataclasses.fields(params)] if params is not None else []
    if sorted(fields) != sorted(scalars):
        raise TypeError(f"{name}: params fields {fields} must be the schema's non-tensor arguments {scalars}")
    impls = dict(impls)

    def kernel(*flat):
        *flat, impl = flat
        fn = impls.get(impl)
        if fn is None:
            raise ValueError(f"{name}: unknown impl {impl!r}; expected one of {sorted(impls)}")
        rule = _DEVICE_RULES.get(impl)
        if rule is not None and not rule[0](_device(flat)):
            raise RuntimeError(rule[1])
        tensors = [v for a, v in zip(args, flat) if a.is_tensor]
        if params is None:
            return fn(*tensors)
        return fn(*tensors, params(**{a.name: v for a, v in zip(args, flat) if not a.is_tensor}))

    op = torch.library.custom_op(
        f"{NAMESPACE}::{name}",
        kernel,
        mutates_args=tuple(a.name for a in args if a.is_written),
        schema=schema,
    )
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op
