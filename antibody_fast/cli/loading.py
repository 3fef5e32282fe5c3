"""The model a command runs on: the base model and its tokenizer, the ``--adapter`` directories merged into it
or trained further, and a fresh LoRA; with the checks that need no model, made before anything is written.

``finetune``'s adapter mode (:func:`adapter_mode`): ``continue`` keeps training the last adapter (the
authors' single LoRA, its own rank and targets), ``merge`` merges it and trains a fresh LoRA. The default
follows the authors: ``merge`` when the adapter's metadata says ``align --method vaccine`` made it.
"""

from __future__ import annotations

import json
import os

from .console import CLIError
from .options import CommonOptions, FinetuneOptions, TrainOptions, given
from .resolve import show

__all__ = ["check_model_source", "check_adapters", "load_model", "adapter_mode"]


def check_model_source(model: str) -> None:
    """Fail early (before anything is written) on a model that cannot be found."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise CLIError(f"--model {model!r}: the directory has no config.json (not a saved HF model)")
        return
    local_like = (
        model.startswith((".", "/", "~"))
        or os.path.exists(os.path.dirname(model) or "\0")
        or model.count("/") > 1
    )
    if local_like:
        raise CLIError(f"--model {model!r}: no such model directory")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a transformers dependency
        return
    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        return
    if offline:
        raise CLIError(
            f"--model {model!r}: not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
            "forbids downloading it"
        )


def check_adapters(adapters: list[str]) -> None:
    """Every ``--adapter`` is a PEFT adapter directory."""
    for path in adapters:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise CLIError(f"--adapter {path!r}: not a PEFT adapter directory (no adapter_config.json)")


def load_model(opts: CommonOptions, device, *, train: bool, adapter_mode: str | None = None):
    """``(model, tokenizer)`` on ``device``: the base model with the ``--adapter`` directories merged in, in
    order. ``train``: plus a trainable LoRA, the last adapter itself when ``adapter_mode == "continue"``,
    else a fresh one (``--lora-r``, ``--lora-alpha``, ``--lora-targets``, seeded with ``--seed``); without
    ``train`` the model is in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_id = opts.model
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[opts.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    except (OSError, ValueError) as e:
        raise CLIError(f"--model {model_id!r}: cannot load the model or its tokenizer: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise CLIError(f"--model {model_id!r}: the tokenizer has no EOS token")
    from ..models import add_lora, load_adapter, merge_adapter

    adapters = list(opts.adapter)
    continued = adapters.pop() if train and adapter_mode == "continue" and adapters else None
    for path in adapters:  # merged into the weights, in order
        try:
            model = merge_adapter(model, path)
        except Exception as e:
            raise CLIError(f"--adapter {path!r}: cannot load it onto {model_id!r}: {e}") from None
    model.to(device)
    if not train:
        model.eval()
        return model, tokenizer
    if continued is not None:  # the authors' single LoRA: keep training the alignment adapter
        try:
            model = load_adapter(model, continued, trainable=True)
        except Exception as e:
            raise CLIError(f"--adapter {continued!r}: cannot load it onto {model_id!r}: {e}") from None
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        model = add_lora(
            model,
            r=opts.lora_r,
            targets=tuple(opts.lora_targets),
            seed=opts.seed,
            alpha=opts.lora_alpha,
        )
    model.to(device)
    model.train()
    return model, tokenizer


def adapter_mode(opts: FinetuneOptions, sources: dict) -> tuple[str | None, str]:
    """``(mode, why)`` for ``finetune``: ``None`` without ``--adapter`` (a fresh LoRA); an explicit
    ``--adapter-mode``; else ``merge`` when the last adapter's metadata says ``align --method vaccine`` made it
    (the authors' pipeline), ``continue`` otherwise (Antibody, Booster, SFT, and adapters without metadata)."""
    from ..models import read_adapter_metadata

    if not opts.adapter:
        if opts.adapter_mode is not None and given(sources, "adapter_mode"):
            raise CLIError("--adapter-mode needs --adapter (without one, fine-tuning trains a fresh LoRA)")
        return None, "no --adapter: a fresh LoRA"
    if opts.adapter_mode is not None:
        mode, why = opts.adapter_mode, f"--adapter-mode {opts.adapter_mode} ({sources['adapter_mode']})"
    else:
        path = opts.adapter[-1]
        try:
            meta = read_adapter_metadata(path) if os.path.isdir(path) else {}
        except ValueError as e:
            raise CLIError(f"--adapter {path!r}: {e}") from None
        made_by = meta.get("method") if meta.get("command", "align") == "align" else None
        mode = "merge" if made_by == "vaccine" else "continue"
        why = (
            f"the adapter was made by align --method {made_by}"
            if made_by
            else "the adapter records no alignment method"
        ) + f": {mode} (the authors' pipeline)"
    if mode == "continue":
        _check_continued_lora(opts, sources, opts.adapter[-1])
    return mode, why


def _check_continued_lora(opts: TrainOptions, sources: dict, path: str) -> None:
    """``continue`` trains the adapter with its own rank, alpha and targets: an explicit ``--lora-r``,
    ``--lora-alpha`` or ``--lora-targets`` that contradicts its ``adapter_config.json`` is an error."""
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError):
        return  # reported when the adapter is checked / loaded
    r = saved.get("r")
    have = {
        "lora_r": r,
        "lora_alpha": saved.get("lora_alpha"),
        "lora_targets": sorted(saved.get("target_modules") or []),
    }
    want = {
        "lora_r": opts.lora_r,
        "lora_alpha": opts.lora_alpha if opts.lora_alpha is not None else 2 * opts.lora_r,
        "lora_targets": sorted(opts.lora_targets),
    }
    for name in ("lora_r", "lora_alpha", "lora_targets"):
        if given(sources, name) and have[name] is not None and want[name] != have[name]:
            raise CLIError(
                f"--{name.replace('_', '-')} {show(want[name])} differs from the adapter's {show(have[name])} "
                f"({path}): --adapter-mode continue trains that adapter as it is; drop the option or pass "
                "--adapter-mode merge"
            )
