"""Model plumbing shared by the steps, the baselines, the references, checkpoints and the integrations.

One place for what every training module needs to know about an HF causal LM (docs/design.md §3):

* **Wrappers.** :func:`unwrap_ddp` strips ``DistributedDataParallel`` / ``DataParallel``; :func:`unwrap_peft`
  returns the transformers model inside a ``PeftModel`` (its adapters stay injected).
* **Trainable parameters.** :func:`trainable_params` / :func:`named_trainable` (``requires_grad`` ones, in
  ``parameters()`` order), :func:`model_device` (their device) and :func:`flat_parameters` (their cached
  :class:`~antibody_fast.flat.FlatParameters`).
* **Trunk and head.** :func:`get_trunk_and_head` splits the model into the decoder trunk (final hidden state),
  the linear lm_head and the logit soft-cap; :func:`parts` caches that split per model, :func:`head_args`
  gives the lm_head weight / bias in the loss dtype and :func:`last_hidden` reads a trunk's output.
* **Key/value cache names.** :func:`cache_argument` is the name under which a trunk's ``forward`` takes the
  cache (``cache`` in newer transformers, ``past_key_values`` before), read once from its signature and
  cached; :func:`output_cache` reads the cache an output returned under either name.
* **Attention blocks** (Vaccine perturbs their outputs): :func:`find_attention_modules`,
  :func:`attention_output`, :func:`replace_attention_output`.

Caches are weak (keyed on the model), so they never keep a model alive. transformers and peft are not imported.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "Parts",
    "attention_output",
    "cache_argument",
    "find_attention_modules",
    "flat_parameters",
    "get_trunk_and_head",
    "head_args",
    "is_fsdp_root",
    "last_hidden",
    "model_device",
    "named_trainable",
    "output_cache",
    "parts",
    "replace_attention_output",
    "trainable_params",
    "unwrap_ddp",
    "unwrap_peft",
]

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


# ------------------------------------------------------------------------------------------------ wrappers
def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``model`` itself if none);
    parameter names then lose the ``module.`` prefix."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a ``PeftModel`` (``get_base_model()``), else ``model`` itself.

    The adapters stay injected in the returned model's layers, so running it runs the adapters.
    """
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


# ---------------------------------------------------------------------------------- trainable parameters
def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """The ``requires_grad`` parameters of ``model``, in ``parameters()`` order (possibly empty)."""
    return [p for p in model.parameters() if p.requires_grad]


def named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the ``requires_grad`` parameters, in ``named_parameters()`` order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def model_device(model: nn.Module) -> torch.device:
    """The device of the first trainable parameter; ``ValueError`` when there is none."""
    params = trainable_params(model)
    if not params:
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True); nothing to optimise "
            "(e.g. add LoRA adapters, or unfreeze some parameters)"
        )
    return params[0].device


_FLAT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def flat_parameters(model: nn.Module):
    """The :class:`~antibody_fast.flat.FlatParameters` of ``model``'s trainable parameters, created on first
    use and cached (weakly) on the model; re-packed if the set of trainable parameters changed or the cached
    buffers went stale (``model.to(dtype/device)`` after packing: an O(1) fingerprint check per call)."""
    model = unwrap_ddp(model)
    flat = _FLAT.get(model)
    params = trainable_params(model)
    if flat is not None and _flat_matches(flat, params) and not flat.is_stale():
        return flat
    from .flat import FlatParameters

    flat = FlatParameters(model)
    _FLAT[model] = flat
    return flat


def _flat_matches(flat, params: list[nn.Parameter]) -> bool:
    mine = flat.parameters
    return len(mine) == len(params) and all(a is b for a, b in zip(mine, params))


# ------------------------------------------------------------------------------------------ trunk and head
def get_trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear, float | None]:
    """Split a causal LM into ``(trunk, lm_head, softcap)``.

    Works for HF ``*ForCausalLM`` models that keep their decoder in ``get_decoder()`` (or ``.model``) and a
    linear ``lm_head`` (Llama, Qwen2, Mistral, Gemma-2, ...), PEFT-wrapped or not.

    * ``trunk(input_ids=..., attention_mask=..., position_ids=..., past_key_values=..., use_cache=...)``
      returns an output whose ``last_hidden_state`` is ``[B, T, H]`` (final norm applied).
    * ``lm_head.weight`` is ``[V, H]`` (``lm_head.bias`` ``[V]`` or ``None``).
    * ``softcap`` is ``config.final_logit_softcapping`` (Gemma-2: logits = softcap * tanh(logits / softcap))
      or ``None``.

    Raises ``TypeError`` for models this does not cover: no linear lm_head, an lm_head wrapped by adapters
    (LoRA or ``modules_to_save`` on the lm_head would be bypassed by the fused op), or a config that rescales
    logits in a way the fused op does not reproduce (``logit_scale``, ``output_multiplier_scale``...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module causal LM, got {type(model).__name__}")
    base = unwrap_peft(model)
    name = type(base).__name__
    get_out = getattr(base, "get_output_embeddings", None)
    lm_head = get_out() if callable(get_out) else getattr(base, "lm_head", None)
    if lm_head is None:
        raise TypeError(f"{name} has no output embedding (lm_head); a causal LM (*ForCausalLM) is required")
    if not isinstance(lm_head, nn.Linear) or hasattr(lm_head, "base_layer"):
        raise TypeError(
            f"{name}.lm_head is a {type(lm_head).__name__}, not a plain torch.nn.Linear (adapters or wrappers "
            "on the lm_head are not supported: the fused log-likelihood op uses lm_head.weight directly)"
        )
    trunk = None
    get_dec = getattr(base, "get_decoder", None)
    if callable(get_dec):
        try:
            trunk = get_dec()
        except (AttributeError, NotImplementedError):
            trunk = None
    if trunk is None or trunk is base:
        trunk = getattr(base, "model", None)
    if not isinstance(trunk, nn.Module) or trunk is base:
        raise TypeError(f"{name}: cannot find the decoder trunk (get_decoder() / .model)")
    config = getattr(base, "config", None)
    for attr in ("logit_scale", "output_multiplier_scale", "logits_scaling"):
        v = getattr(config, attr, None)
        if v is not None and v != 1 and v != 1.0:
            raise TypeError(f"{name}: config.{attr}={v} rescales logits; not supported by get_trunk_and_head")
    softcap = getattr(config, "final_logit_softcapping", None)
    return trunk, lm_head, (float(softcap) if softcap else None)


@dataclass
class Parts:
    """A model's :func:`get_trunk_and_head` split, cached by :func:`parts`."""

    trunk: nn.Module
    lm_head: nn.Module
    softcap: float | None
    cache_ok: bool = True  # False once the model returned no (or an unsupported) key/value cache
    cache_arg: str | None = None  # the trunk's name for the key/value cache argument (cache_argument)
    # the model itself when it is an FSDP2 root: the steps then run the trunk inside its forward
    fsdp_root: nn.Module | None = None
    warned: set[str] = field(default_factory=set)  # one-time messages already given for this model


_PARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def parts(model: nn.Module) -> Parts:
    """The cached :class:`Parts` of ``model`` (split on first use)."""
    p = _PARTS.get(model)
    if p is None:
        trunk, lm_head, softcap = get_trunk_and_head(model)
        p = Parts(trunk, lm_head, softcap)
        _PARTS[model] = p
    # fully_shard swaps the model's class in place, so this is checked at every call (one isinstance)
    p.fsdp_root = model if is_fsdp_root(model) else None
    return p


def is_fsdp_root(model: nn.Module) -> bool:
    """True when ``model`` itself is an FSDP2 module (``fully_shard`` was applied to it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def head_args(lm_head: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lm_head weight / bias in ``dtype`` (the loss dtype: under autocast HF's lm_head runs in the autocast
    dtype, which the hidden states already have); no copy when they already are in it. The fused op reads the
    weight directly, so FSDP2's hooks do not gather it: a weight still sharded (DTensor) is gathered here
    (differentiable, its gradient summed over ranks; memory: one full lm_head weight). Inside the steps' FSDP2
    path the root's forward has already gathered it (:func:`antibody_fast.fsdp.root_hidden`)."""
    w = _gathered(lm_head.weight)
    b = getattr(lm_head, "bias", None)
    b = None if b is None else _gathered(b)
    if w.dtype != dtype:
        w = w.to(dtype)
        b = None if b is None else b.to(dtype)
    return w, b


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) weight gathered in full; ``t`` itself otherwise. The gradient of the full tensor is
    marked partial (each rank holds its own samples' share), so backward reduce-scatters it into the shards."""
    if not hasattr(t, "full_tensor"):
        return t
    if not t.requires_grad:
        return t.full_tensor()
    from torch.distributed.tensor import Partial, Replicate

    full = t.redistribute(placements=[Replicate()] * t.device_mesh.ndim)
    return full.to_local(grad_placements=[Partial()] * t.device_mesh.ndim)


def cache_argument(p: Parts) -> str:
    """The keyword under which ``p.trunk.forward`` takes the key/value cache: ``"cache"`` when its signature
    names it (newer transformers, where ``past_key_values`` is a deprecated alias), else
    ``"past_key_values"`` (older transformers, and any forward whose signature cannot be read). Read from the
    signature once per model, never from a version string."""
    if p.cache_arg is None:
        try:
            names = inspect.signature(p.trunk.forward).parameters
        except (TypeError, ValueError):
            names = {}
        p.cache_arg = "cache" if "cache" in names else "past_key_values"
    return p.cache_arg


def output_cache(out):
    """The key/value cache a trunk returned: ``out.cache`` where the output has that field (newer
    transformers; its ``past_key_values`` alias is then not touched), else ``out.past_key_values``, else
    ``None`` (a tuple output, or no cache)."""
    if hasattr(out, "cache"):
        return out.cache
    return getattr(out, "past_key_values", None)


def last_hidden(out) -> torch.Tensor:
    """The ``[B, T, H]`` final hidden state of a trunk's output (a ModelOutput or a tuple)."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


# -------------------------------------------------------------------------------------- attention blocks
def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention block of every decoder layer, in layer order.

    A module counts when its attribute name is one of ``self_attn``, ``attn``, ``attention``,
    ``self_attention`` (HF Llama, Qwen2, Gemma, Mistral, GPT-2 naming) and it has parameters; nested matches
    (an ``attn`` inside a ``self_attn``) are skipped. PEFT-wrapped models work (LoRA layers live inside).
    """
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _ATTENTION_NAMES and any(True for _ in mod.parameters()):
            if any(name.startswith(prev + ".") for prev, _ in found):
                continue
            found.append((name, mod))
    if not found:
        raise ValueError(
            "no attention block found (looked for submodules named " + ", ".join(_ATTENTION_NAMES) + "); "
            "pass attention_modules= explicitly"
        )
    return [m for _, m in found]


def attention_output(output) -> torch.Tensor:
    """The hidden-state output of an attention block (HF blocks return a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output


def replace_attention_output(output, value: torch.Tensor):
    """``output`` with its hidden-state output replaced by ``value`` (for a forward hook's return)."""
    if isinstance(output, tuple):
        return (value, *output[1:])
    return value
