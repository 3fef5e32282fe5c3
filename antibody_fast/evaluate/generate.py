"""Greedy generation for evaluation: batched, left padded, ``do_sample=False``, at most ``max_new_tokens``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["greedy_generate"]


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> list[str]:
    """Greedy answers to ``prompts``, batched (left padding), at most ``max_new_tokens`` new tokens each.

    Args:
        model: an HF causal LM (PEFT-wrapped or not) on its device.
        tokenizer: its tokenizer; needs a pad token (the EOS token is used when it has none).
        prompts: the prompt strings (already formatted, e.g. with the Alpaca template).
        max_prompt_length: keep only the last tokens of longer prompts (``None``: no limit).
        progress: optional callback called with the number of prompts finished after each batch.

    Returns:
        the decoded new text of each prompt (special tokens skipped), in order.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("greedy_generate: the tokenizer has neither a pad nor an EOS token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = list(prompts[s : s + batch_size])
            rows = [tokenizer(p)["input_ids"] for p in chunk]
            if max_prompt_length is not None:
                rows = [r[-max_prompt_length:] for r in rows]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                if r:
                    ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                    mask[i, width - len(r) :] = 1
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, width:].cpu()
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return outputs
