"""Collators that build prompt-aligned batches (see :mod:`antibody_fast.data.batch`).

Examples are mappings ``{"prompt": str | list[int], "response": str | list[int], "index": int,
"is_harmful": bool (optional)}``.

* Token-id prompts, responses and refusals are used exactly as given: no BOS or EOS is added, and no tokenizer
  is needed.
* Text is tokenized with the collator's tokenizer: the prompt with the tokenizer's defaults (special tokens such
  as BOS included), responses and text refusals without special tokens and with EOS appended, as HF SFT does.
* Truncation to ``max_length`` (prompt + answer): the prompt loses its oldest tokens first (from the left, down
  to one token), then the answer is cut from the right. The refusal of a fine-tuning sample sits on the same
  (truncated) prompt and is cut from the right to ``max_length - prompt length``.
* Sample ``i`` gets refusal pool entry ``index_i mod len(pool)``, fixed across epochs.

Tensors are built on the CPU; move a batch with ``batch.to(device)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .batch import IGNORE_INDEX, AlignBatch, FinetuneBatch, LMBatch
from .refusals import DEFAULT_REFUSALS

__all__ = ["FinetuneCollator", "AlignCollator"]


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _pad_rows(rows: list[list[int]], width: int, value: int, left: bool) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            t = torch.tensor(row, dtype=torch.long)
            if left:
                out[i, width - len(row) :] = t
            else:
                out[i, : len(row)] = t
    return out


class _Collator:
    """Shared tokenization, validation, truncation and padding."""

    def __init__(self, tokenizer=None, refusals=None, max_length: int = 512, pad_token_id: int | None = 0):
        if not _is_int(max_length) or max_length < 2:
            raise ValueError(
                f"max_length must be an int >= 2 (one prompt and one answer token), got {max_length!r}"
            )
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
            pad_token_id = 0 if pad_token_id is None else pad_token_id
        if not _is_int(pad_token_id) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self._vocab_size: int | None = None
        self._eos: int | None = None
        if tokenizer is not None:
            if not callable(tokenizer):
                raise TypeError(f"tokenizer must be a callable HF tokenizer, got {type(tokenizer).__name__}")
            self._eos = getattr(tokenizer, "eos_token_id", None)
            if self._eos is None:
                raise ValueError(
                    "the tokenizer has no eos_token_id; it is appended to text responses and refusals"
                )
            try:
                self._vocab_size = len(tokenizer)
            except TypeError:
                self._vocab_size = None
        pool = DEFAULT_REFUSALS if refusals is None else refusals
        self.refusal_pool: list[list[int]] = self._encode_pool(pool, default=refusals is None)

    # ----------------------------------------------------------------------------------------------- encoding
    def _check_ids(self, ids: Sequence[Any], what: str) -> list[int]:
        out = []
        for t in ids:
            if not _is_int(t):
                raise TypeError(f"{what}: token ids must be ints, got {type(t).__name__}")
            t = int(t)
            if t < 0 or (self._vocab_size is not None and t >= self._vocab_size):
                bound = f" < {self._vocab_size}" if self._vocab_size is not None else ""
                raise ValueError(f"{what}: token id {t} out of range (need 0 <= id{bound})")
            out.append(t)
        return out

    def _as_ids(self, value: Any, what: str) -> list[int] | None:
        """Token-id list for ``value`` if it is given as ids, else None (text)."""
        if isinstance(value, str):
            return None
        if isinstance(value, torch.Tensor):
            if (
                value.dim() != 1
                or value.is_floating_point()
                or value.is_complex()
                or value.dtype == torch.bool
            ):
                raise TypeError(
                    f"{what}: a tensor of token ids must be 1-D and integer, got {value.dtype}, "
                    f"shape {tuple(value.shape)}"
                )
            return self._check_ids(value.tolist(), what)
        if isinstance(value, np.ndarray):
            if value.ndim != 1 or value.dtype.kind not in "iu":
                raise TypeError(
                    f"{what}: an array of token ids must be 1-D and integer, got {value.dtype}, "
                    f"shape {value.shape}"
                )
            return self._check_ids(value.tolist(), what)
        if isinstance(value, (list, tuple)):
            return self._check_ids(value, what)
        raise TypeError(f"{what}: expected str or a list of token ids, got {type(value).__name__}")

    def _tokenize(self, text: str, what: str, *, special: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                f"{what} is text but the collator has no tokenizer; pass tokenizer= or token ids"
            )
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [int(t) for t in ids]

    def _encode_prompt(self, value: Any, what: str) -> list[int]:
        ids = self._as_ids(value, what)
        if ids is None:
            ids = self._tokenize(value, what, special=True)
        return ids

    def _encode_answer(self, value: Any, what: str) -> list[int]:
        ids = self._as_ids(value, what)
        if ids is None:
            ids = self._tokenize(value, what, special=False) + [self._eos]
        return ids

    def _encode_pool(self, pool: Any, default: bool) -> list[list[int]]:
        if isinstance(pool, (str, torch.Tensor)) or not isinstance(pool, Sequence):
            raise TypeError("refusals must be a sequence of strings or of token-id lists")
        if len(pool) == 0:
            raise ValueError("the refusal pool is empty")
        if self.tokenizer is None and any(isinstance(r, str) for r in pool):
            which = "the default refusal pool" if default else "refusals="
            raise ValueError(
                f"{which} holds text but the collator has no tokenizer: pass tokenizer= or refusals= as "
                "token-id lists"
            )
        out = []
        for j, r in enumerate(pool):
            ids = self._encode_answer(r, f"refusal pool entry {j}")
            if not ids:
                raise ValueError(f"refusal pool entry {j} is empty")
            out.append(ids)
        return out

    # ----------------------------------------------------------------------------------------------- examples
    def _read(self, examples: Any, name: str):
        """Validate and encode examples -> (prompts, answers, indices, flags or None)."""
        if isinstance(examples, Mapping) or not isinstance(examples, Sequence) or isinstance(examples, str):
            raise TypeError(f"{name}: expected a list of example dicts, got {type(examples).__name__}")
        if len(examples) == 0:
            raise ValueError(f"{name}: the example list is empty")
        prompts, answers, indices, flags = [], [], [], []
        for pos, ex in enumerate(examples):
            if not isinstance(ex, Mapping):
                raise TypeError(
                    f"{name}: example at position {pos} is a {type(ex).__name__}, expected a dict"
                )
            if "index" not in ex:
                raise ValueError(f"{name}: example at position {pos} is missing the field 'index'")
            idx = ex["index"]
            if isinstance(idx, torch.Tensor) and idx.numel() == 1 and not idx.is_floating_point():
                idx = idx.item()
            if not _is_int(idx) or idx < 0:
                raise ValueError(
                    f"{name}: example at position {pos}: 'index' must be a non-negative int, got {idx!r}"
                )
            idx = int(idx)
            for field in ("prompt", "response"):
                if field not in ex or ex[field] is None:
                    raise ValueError(f"{name}: example index {idx} is missing the field {field!r}")
            prompt = self._encode_prompt(ex["prompt"], f"{name}: example index {idx} 'prompt'")
            answer = self._encode_answer(ex["response"], f"{name}: example index {idx} 'response'")
            if not prompt:
                raise ValueError(
                    f"{name}: example index {idx} has an empty prompt (the first answer token needs "
                    "at least one prompt token to be predicted from)"
                )
            prompt, answer = self._truncate(prompt, answer)
            if not answer:
                raise ValueError(
                    f"{name}: example index {idx} has a response with zero tokens "
                    f"(after truncation to max_length={self.max_length})"
                )
            flag = ex.get("is_harmful")
            if isinstance(flag, (torch.Tensor, np.bool_)):
                flag = bool(flag)
            if flag is not None and not isinstance(flag, bool):
                raise TypeError(f"{name}: example index {idx}: 'is_harmful' must be a bool, got {flag!r}")
            prompts.append(prompt)
            answers.append(answer)
            indices.append(idx)
            flags.append(flag)
        have = [f is not None for f in flags]
        if any(have) and not all(have):
            missing = [indices[i] for i, h in enumerate(have) if not h]
            raise ValueError(f"{name}: 'is_harmful' is given for some examples but not for indices {missing}")
        return prompts, answers, indices, (flags if all(have) else None)

    def _truncate(self, prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
        over = len(prompt) + len(answer) - self.max_length
        if over > 0:
            cut = min(over, len(prompt) - 1)
            prompt = prompt[cut:]
            over -= cut
            if over > 0:
                answer = answer[: max(len(answer) - over, 0)]
        return prompt, answer

    def _lm_batch(self, prompts, answers, indices, flags) -> LMBatch:
        p = max(len(x) for x in prompts)
        ta = max(len(x) for x in answers)
        plens = torch.tensor([len(x) for x in prompts], dtype=torch.long)
        alens = torch.tensor([len(x) for x in answers], dtype=torch.long)
        prompt_ids = _pad_rows(prompts, p, self.pad_token_id, left=True)
        answer_ids = _pad_rows(answers, ta, self.pad_token_id, left=False)
        col_p = torch.arange(p)
        col_a = torch.arange(ta)
        prompt_mask = (col_p[None, :] >= (p - plens)[:, None]).long()
        answer_mask = (col_a[None, :] < alens[:, None]).long()
        prompt_pos = (col_p[None, :] - (p - plens)[:, None]).clamp_min(0) * prompt_mask
        answer_pos = (plens[:, None] + col_a[None, :]) * answer_mask
        answer_labels = answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)
        return LMBatch(
            input_ids=torch.cat([prompt_ids, answer_ids], dim=1),
            attention_mask=torch.cat([prompt_mask, answer_mask], dim=1),
            position_ids=torch.cat([prompt_pos, answer_pos], dim=1),
            labels=torch.cat(
                [torch.full((len(prompts), p), IGNORE_INDEX, dtype=torch.long), answer_labels], dim=1
            ),
            prompt_len=p,
            prompt_lengths=plens,
            index=torch.tensor(indices, dtype=torch.long),
            is_harmful=None if flags is None else torch.tensor(flags, dtype=torch.bool),
        )

    def _finetune_batch(self, examples: Any, name: str) -> FinetuneBatch:
        prompts, answers, indices, flags = self._read(examples, name)
        lm = self._lm_batch(prompts, answers, indices, flags)
        pool = self.refusal_pool
        refusals = [pool[i % len(pool)][: self.max_length - len(pr)] for i, pr in zip(indices, prompts)]
        tr = max(len(r) for r in refusals)
        refusal_ids = _pad_rows(refusals, tr, self.pad_token_id, left=False)
        rlens = torch.tensor([len(r) for r in refusals], dtype=torch.long)
        refusal_mask = (torch.arange(tr)[None, :] < rlens[:, None]).long()
        return FinetuneBatch(
            **{k: getattr(lm, k) for k in LMBatch.__dataclass_fields__},
            refusal_ids=refusal_ids,
            refusal_mask=refusal_mask,
            refusal_labels=refusal_ids.masked_fill(refusal_mask == 0, IGNORE_INDEX),
        )


class FinetuneCollator(_Collator):
    """Collate user samples into a :class:`FinetuneBatch` (sample + refusal on the same prompt).

    Args:
        tokenizer: an HF tokenizer, needed only for text fields and text refusal pools.
        refusals: the refusal pool: strings (tokenized with ``tokenizer``, EOS appended) or token-id lists (used
            as given). Default: :data:`antibody_fast.data.DEFAULT_REFUSALS` (text, so it needs a tokenizer).
        max_length: maximum prompt + answer length in tokens (>= 2); see the module docstring for truncation.
        pad_token_id: id written into padding columns (they are masked, so any valid id works). ``None`` takes
            the tokenizer's pad id, else 0.

    ``collator(examples)`` returns a :class:`FinetuneBatch` on the CPU with ``input_ids``/``attention_mask``/
    ``position_ids``/``labels`` of shape ``[B, P + Ta]`` and ``refusal_*`` of shape ``[B, Tr]`` (all int64).
    Raises ``ValueError`` on an empty list, a missing field (named with the example's index), an empty prompt
    or a response with zero tokens.
    """

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> FinetuneBatch:
        return self._finetune_batch(examples, "FinetuneCollator")


class AlignCollator(_Collator):
    """Collate the alignment stage's data into an :class:`AlignBatch` (DESIGN.md §2.2).

    Same arguments as :class:`FinetuneCollator`. Called as ``collator(align_examples, harmful_examples)``:

    * ``align``: ``align_examples`` as prompt -> response (harmful prompt -> refusal answer);
    * ``harmful``: ``harmful_examples`` as prompt -> response (harmful prompt -> harmful answer);
    * ``refusal``: the same prompts as ``harmful``, each answered by pool entry ``index mod len(pool)``.
    """

    def __call__(
        self, align_examples: Sequence[Mapping[str, Any]], harmful_examples: Sequence[Mapping[str, Any]]
    ) -> AlignBatch:
        align = self._lm_batch(*self._read(align_examples, "AlignCollator (align examples)"))
        harmful = self._finetune_batch(harmful_examples, "AlignCollator (harmful examples)")
        return AlignBatch(align=align, harmful=harmful.answer_view(), refusal=harmful.refusal_view())
