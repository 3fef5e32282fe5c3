"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support for the steps (docs/design.md §3 "Scaling out").

What the steps need from an FSDP2 model, and what this module provides:

* :func:`shard_model` wraps a causal LM the way the steps expect: ``fully_shard`` on every decoder layer, then on
  the root (PEFT wrapper included), with sum reduction (:func:`use_sum_reduction`). Any other wrapping that
  shards every trainable parameter ``Shard(0)`` on one 1-D mesh works too (accelerate's FSDP2 plugin does that).
* :func:`use_sum_reduction`: every loss of the steps is already this rank's share of the *global* loss (global
  token counts, the softmax over the global batch), so the gradients must be **summed** over ranks. FSDP2
  averages by default; this sets every FSDP module's gradient divide factor to 1 with sum-only collectives. The
  steps call it on every model they see (idempotent, host-only).
* :func:`root_hidden`: the steps call the decoder trunk and then the fused lm_head op on its hidden states. Under
  FSDP2 the trunk must run *inside the root module's forward*, so that the root's hooks run (lazy init, the
  all-gather of the root's own parameters -- embeddings, final norm, lm_head --, the stream waits and the
  post-backward callback that finishes the reduce-scatters). :func:`root_hidden` runs the root's forward with the
  lm_head's ``forward`` swapped for one that records its input and returns an empty tensor, so the ``[B, T, V]``
  logits are never computed; the recorded input is the trunk's final hidden state. The root keeps its own
  parameters unsharded from its forward to the end of backward (FSDP2's root default), so the fused op reads the
  full lm_head weight (memory: one full lm_head weight per rank, plus the op's working set), and a trainable or
  tied lm_head gets its gradient reduce-scattered by the root's post-backward like any other root parameter.

The flat-buffer side (local shards, the reduce-scatter adding into the flat gradient) is in
:class:`antibody_fast.flat.FlatParameters`; the global norms and dot products pass ``group=flat.shard_group`` to
the flat ops.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ._model import (
    cache_argument,
    is_fsdp_root,
    named_trainable,
    output_cache,
    parts,
    unwrap_ddp,
    unwrap_peft,
)

__all__ = [
    "fsdp_modules",
    "full_trainable_state",
    "is_fsdp",
    "root_hidden",
    "shard_model",
    "use_sum_reduction",
]


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every FSDP2-wrapped module in ``model`` (``model`` itself included), outermost first."""
    return [m for m in model.modules() if is_fsdp_root(m)]


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model`` (DDP wrapper stripped) is itself an FSDP2 module: the steps then run it as the root."""
    return is_fsdp_root(unwrap_ddp(model))


def use_sum_reduction(model: nn.Module) -> None:
    """Make FSDP2 *sum* the gradients over ranks (divide factor 1, sum-only collectives) on every FSDP module of
    ``model``. The steps' losses are shares of the global loss, so the sum is the global gradient; FSDP2's default
    average would divide it by the world size. Idempotent; no communication."""
    for m in fsdp_modules(model):
        if getattr(m, "_antibody_sum", False):
            continue
        m.set_gradient_divide_factor(1.0)
        if hasattr(m, "set_force_sum_reduction_for_comms"):
            m.set_force_sum_reduction_for_comms(True)
        m._antibody_sum = True


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    trunk = parts(model).trunk
    layers = getattr(trunk, "layers", None)
    if layers is None:
        layers = getattr(trunk, "h", None)  # GPT-2 naming
    if layers is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"shard_model: cannot find the decoder layers of {type(trunk).__name__} (.layers / .h); wrap the "
            "model yourself: fully_shard(layer) for each layer, then fully_shard(model)"
        )
    return list(layers)


def shard_model(
    model: nn.Module,
    *,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
) -> nn.Module:
    """Shard a causal LM with FSDP2 for the steps: ``fully_shard`` on each decoder layer, then on ``model``
    (the root; a ``PeftModel`` stays the root), then :func:`use_sum_reduction`.

    Args:
        model: HF causal LM, PEFT-wrapped or not, on its training device. ``torch.distributed`` must be
            initialised.
        mesh: a 1-D ``DeviceMesh`` (default: all ranks, FSDP2's default).
        reshard_after_forward: FSDP2's option for the layers (``True``: ZeRO-3 memory; ``False``: ZeRO-2,
            one all-gather per layer per forward/backward pair instead of two).
        mp_policy: optional ``torch.distributed.fsdp.MixedPrecisionPolicy``.

    Returns:
        ``model`` itself, now an FSDP2 module: every parameter is a ``DTensor`` sharded on dim 0.

    Peak memory per rank: the local shards of everything (1/world of the model), plus one decoder layer
    unsharded at a time during forward and backward, plus the root's own parameters (embeddings, final norm and
    lm_head) unsharded for the whole step, plus activations.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model: torch.distributed is not initialised (run under torchrun)")
    if is_fsdp(model):
        raise ValueError("shard_model: the model is already FSDP2-wrapped")
    kw: dict[str, Any] = {}
    if mesh is not None:
        kw["mesh"] = mesh
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for layer in _decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, **kw)
    use_sum_reduction(model)
    return model


@contextlib.contextmanager
def _head_bypassed(lm_head: nn.Module, held: dict):
    """Inside: ``lm_head(x)`` records ``x`` in ``held["hidden"]`` and returns an empty ``[..., 0]`` tensor."""

    def record(x, *args, **kwargs):
        held["hidden"] = x
        return x.new_empty((*x.shape[:-1], 0))

    lm_head.forward = record
    try:
        yield
    finally:
        del lm_head.forward


def root_hidden(
    model: nn.Module, input_ids, attention_mask, position_ids, *, use_cache: bool, past=None
) -> tuple[torch.Tensor, Any]:
    """The trunk's final hidden state ``[B, T, H]`` and key/value cache (or None), computed by the root module's
    forward so that FSDP2's root hooks run; the lm_head is bypassed (module docstring).

    ``model`` is the FSDP2 root (DDP wrapper stripped); ``past`` is passed under the trunk's cache argument name."""
    root = unwrap_ddp(model)
    p = parts(root)
    kwargs: dict[str, Any] = {}
    if past is not None:
        kwargs[cache_argument(p)] = past
    if not getattr(root, "_antibody_sum", False):
        use_sum_reduction(root)
    held: dict = {}
    with _head_bypassed(p.lm_head, held):
        out = root(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
    if "hidden" not in held:
        raise RuntimeError(
            f"{type(unwrap_peft(root)).__name__}'s forward did not call its lm_head; the steps need a causal LM "
            "whose forward ends with lm_head(hidden_states)"
        )
    return held["hidden"], (output_cache(out) if use_cache else None)


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: full tensor}`` of the trainable parameters, gathered from their shards (collective: every rank
    calls it, in the same order; every rank gets the full tensors). Plain parameters are returned detached."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
        for n, p in named_trainable(unwrap_ddp(model)).items()
    }
