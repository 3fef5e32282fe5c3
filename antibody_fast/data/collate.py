"""Collators that build prompt-aligned batches (see :mod:`antibody_fast.data.batch`).

Examples are mappings ``{"prompt": str | list[int], "response": str | list[int], "index": int,
"is_harmful": bool (optional)}``.

**Tokenization** follows the authors' recipe (docs/design.md §2.4):

* A text prompt with a text answer is tokenized as ONE text, ``tokenize(prompt + answer)`` with the
  tokenizer's defaults (BOS included), and EOS is appended. Its first ``len(tokenize(prompt))`` tokens count
  as the prompt (labels ``-100``); the rest is the answer. This differs from tokenizing the answer on its own
  at the boundary: a SentencePiece-style tokenizer with a prefix space tokenizes
  ``"...### Response:\\nI can't"`` jointly as ``[..., '\\n', 'I', '▁can', ...]`` (Llama-2: ``'<0x0A>', 'I'``),
  but ``"I can't"`` alone as ``['▁I', '▁can', ...]``. Appending the EOS id equals tokenizing
  ``prompt + answer + eos_token`` as the authors do, for every tokenizer that parses its own EOS token in text
  (all Hugging Face tokenizers by default).
* A text refusal (the pool) takes the same path on the sample's prompt: ``tokenize(prompt + refusal)`` + EOS,
  split at ``len(tokenize(prompt))``.
* Token ids are used exactly as given: no BOS or EOS is added, and no tokenizer is needed. A text prompt with
  an id answer (or refusal) is ``tokenize(prompt)`` followed by the ids; an id prompt with a text answer (or
  refusal) tokenizes the answer on its own without special tokens and appends EOS.
* The authors count ``len(tokenize(prompt))`` as the tokens that differ from the pad id; we count every token.
  The two agree unless the prompt contains the pad token itself.

**Shared prompt columns.** A fine-tuning sample's completion and refusal views must start from the same prompt
tokens, because the refusal is scored as a continuation of the completion's prompt key/value cache (columns
``< P``, docs/design.md §3). The authors split both views at ``n = len(tokenize(prompt))``. When the
tokenizer merges the prompt's last characters with the answer's first ones (e.g. a prompt ending in a space),
the two joint tokenizations can differ inside their first ``n`` tokens. The collator then puts only the
longest common prefix ``s <= n`` of the two sequences in the prompt columns, and keeps the tokens
``s .. n - 1`` of each view at the start of its answer (or refusal) region with label ``-100``. Both views are
then exactly the authors' token sequences with the authors' labels, and they share their prompt columns. A
prompt ending in ``"\\n"`` (the Alpaca template) gives ``s = n``, and no answer label is masked, with any
tokenizer that never merges a newline with the following word (the SentencePiece-style test tokenizer is
one).

**Truncation** to ``max_length`` tokens:

* ``truncation="right"`` (default, the authors' rule): each full sequence (prompt + answer, prompt + refusal)
  is cut on the right to ``max_length`` tokens, and the prompt part to at most ``max_length``.
* ``truncation="left"``: the previous behaviour. The prompt loses its oldest tokens first (down to one token),
  then the answer is cut from the right; the refusal sits on the same (truncated) prompt and is cut from the
  right to ``max_length - prompt length``.

A sample whose answer (or refusal) keeps no labelled token after truncation is *overlong*: the collator raises
a ``ValueError`` naming it, or, with ``drop_overlong=True``, leaves it out of the batch. Dropped samples are
counted on the batch (``batch.num_dropped``) and on the collator (``collator.num_dropped``, and
``collator.dropped_indices`` or ``dropped_align_indices`` / ``dropped_harmful_indices``). For training,
filter the dataset once up front with :meth:`FinetuneCollator.split_overlong` /
:meth:`AlignCollator.split_overlong`, so that every batch keeps its size.

**Bounded reading.** Only the first ``max_chars`` characters of a text field are tokenized (for
``"left"``, the prompt's last ones), cut at a whitespace; default ``max_chars = 16 * max_length``, so a 5 MB
record does not cost a 5 MB tokenization. When those characters hold fewer than ``max_length + 16`` tokens,
the window doubles and the field is tokenized again. The kept tokens are then those of the whole text
whenever the cut changes no token more than 16 tokens away from it (true of tokenizers whose tokens do not
span the whitespace the cut is made at, i.e. that split text into words first).

Sample ``i`` gets refusal pool entry ``index_i mod len(pool)``, fixed across epochs (the authors' rule).
Tensors are built on the CPU; move a batch with ``batch.to(device)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .batch import IGNORE_INDEX, AlignBatch, FinetuneBatch, LMBatch
from .refusals import DEFAULT_REFUSALS

__all__ = ["FinetuneCollator", "AlignCollator", "OverlongSplit", "TRUNCATION_SIDES"]

TRUNCATION_SIDES = ("right", "left")
# tokens beyond max_length that a character window must hold before its cut is trusted not to matter
_CUT_MARGIN = 16
# default characters per token of max_length read from a text field before tokenizing
CHARS_PER_TOKEN = 16


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


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _cut_head(text: str, width: int) -> tuple[str, bool]:
    """The first ``<= width`` characters of ``text``, cut before a whitespace when one is near the end."""
    if len(text) <= width:
        return text, False
    for k in range(width, width // 2, -1):
        if text[k].isspace() and not text[k - 1].isspace():
            return text[:k], True
    return text[:width], True


def _cut_tail(text: str, width: int) -> tuple[str, bool]:
    """The last ``<= width`` characters of ``text``, starting after a whitespace near the start if any."""
    if len(text) <= width:
        return text, False
    start = len(text) - width
    for k in range(start, start + width // 2):
        if text[k - 1].isspace() and not text[k].isspace():
            return text[k:], True
    return text[start:], True


class OverlongSplit(NamedTuple):
    """Result of ``split_overlong``: the examples that fit and those whose answer truncation cuts away."""

    kept: list
    dropped: list


class _Encoded(NamedTuple):
    """One sample in the prompt-aligned layout, before padding."""

    prompt: list[int]
    answer: list[int]
    refusal: list[int] | None
    skip: int  # leading answer / refusal tokens labelled -100 (the authors' split counts them as prompt)


class _Collator:
    """Shared tokenization, validation, truncation and padding (see the module docstring)."""

    def __init__(
        self,
        tokenizer=None,
        refusals=None,
        max_length: int = 512,
        pad_token_id: int | None = 0,
        *,
        truncation: str = "right",
        drop_overlong: bool = False,
        max_chars: int | None = None,
    ):
        if not _is_int(max_length) or max_length < 2:
            raise ValueError(
                f"max_length must be an int >= 2 (one prompt and one answer token), got {max_length!r}"
            )
        if truncation not in TRUNCATION_SIDES:
            raise ValueError(f"truncation must be one of {TRUNCATION_SIDES}, got {truncation!r}")
        if not isinstance(drop_overlong, bool):
            raise TypeError(f"drop_overlong must be a bool, got {drop_overlong!r}")
        if max_chars is None:
            max_chars = CHARS_PER_TOKEN * int(max_length)
        if not _is_int(max_chars) or max_chars < 1:
            raise ValueError(f"max_chars must be a positive int or None, got {max_chars!r}")
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
            pad_token_id = 0 if pad_token_id is None else pad_token_id
        if not _is_int(pad_token_id) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self.truncation = truncation
        self.drop_overlong = drop_overlong
        self.max_chars = int(max_chars)
        self.num_dropped = 0
        self._dropped: dict[str, set[int]] = {}
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
        self._pool_raw: list[str | list[int]] = []
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

    @property
    def _need(self) -> int:
        """Tokens a cut character window must yield for its cut not to reach the first max_length tokens."""
        return self.max_length + _CUT_MARGIN

    def _alone(self, text: str, what: str) -> list[int]:
        """``text`` tokenized on its own without special tokens, EOS appended (id prompts), reading a bounded
        head of the text."""
        width = self.max_chars
        while True:
            head, cut = _cut_head(text, width)
            ids = self._tokenize(head, what, special=False)
            if not cut:
                return ids + [self._eos]
            if len(ids) >= self._need:
                return ids
            width *= 2

    def _text_prompt(self, prompt: str, what: str) -> tuple[str, list[int], bool]:
        """(the prompt text read, ``tokenize(prompt)`` of it, whether it was cut)."""
        width = self.max_chars
        cutter = _cut_tail if self.truncation == "left" else _cut_head
        while True:
            text, cut = cutter(prompt, width)
            ids = self._tokenize(text, what, special=True)
            if not cut or len(ids) >= self._need:
                return text, ids, cut
            width *= 2

    def _joint(self, prompt_text: str, prompt_ids: list[int], answer: str, what: str) -> list[int]:
        """``tokenize(prompt + answer)`` + EOS, reading a bounded head of ``answer``."""
        width = self.max_chars
        while True:
            head, cut = _cut_head(answer, width)
            ids = self._tokenize(prompt_text + head, what, special=True)
            if not cut:
                return ids + [self._eos]
            if len(ids) - len(prompt_ids) >= self._need:
                return ids
            width *= 2

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
            what = f"refusal pool entry {j}"
            ids = self._as_ids(r, what)
            if ids is None:
                self._pool_raw.append(r)
                ids = self._alone(r, what)
            else:
                if not ids:
                    raise ValueError(f"refusal pool entry {j} is empty")
                self._pool_raw.append(ids)
            out.append(ids)
        return out

    def _sequence(self, prompt_text, prompt_ids: list[int], value: Any, what: str) -> list[int]:
        """The full token sequence prompt + ``value`` (answer or refusal) as the authors build it."""
        ids = value if isinstance(value, list) else self._as_ids(value, what)
        if ids is not None:
            return prompt_ids + ids
        if prompt_text is None:  # id prompt: the text is tokenized on its own
            return prompt_ids + self._alone(value, what)
        return self._joint(prompt_text, prompt_ids, value, what)

    def _encode(self, prompt: Any, answer: Any, refusal: Any, what: str) -> tuple[_Encoded, bool]:
        """One sample -> (layout, overlong?). ``refusal`` is None for samples without a refusal view."""
        n_max = self.max_length
        ids = self._as_ids(prompt, f"{what} 'prompt'")
        if ids is None:
            prompt_text, ids, prompt_cut = self._text_prompt(prompt, f"{what} 'prompt'")
        else:
            prompt_text, prompt_cut = None, False
        if not ids:
            raise ValueError(
                f"{what} has an empty prompt (the first answer token needs at least one prompt token to be "
                "predicted from)"
            )
        n_prompt = len(ids)
        answer_ids = self._as_ids(answer, f"{what} 'response'")
        if answer_ids is not None and not answer_ids:
            raise ValueError(f"{what} has a response with zero tokens")
        right = self.truncation == "right"
        if right and prompt_cut:  # the prompt alone fills max_length: every answer is cut away
            seq, seq_r = ids, (ids if refusal is not None else None)
        else:
            seq = self._sequence(
                prompt_text, ids, answer if answer_ids is None else answer_ids, what + " 'response'"
            )
            seq_r = None
            if refusal is not None:
                seq_r = self._sequence(prompt_text, ids, refusal, what + " refusal")
        if right:
            n_prompt = min(n_prompt, n_max)
            seq = seq[:n_max]
            seq_r = None if seq_r is None else seq_r[:n_max]
        split = n_prompt if seq_r is None else _common_prefix(seq, seq_r, n_prompt)
        if split == 0:
            raise ValueError(
                f"{what}: the answer and the refusal share no prompt token (the tokenizer merges the "
                "prompt's first token with the answer); the refusal cannot continue the prompt"
            )
        prompt_part, answer_part = seq[:split], seq[split:]
        refusal_part = None if seq_r is None else seq_r[split:]
        if not right:
            over = len(prompt_part) + len(answer_part) - n_max
            if over > 0:
                cut = min(over, len(prompt_part) - 1)
                prompt_part = prompt_part[cut:]
                over -= cut
                if over > 0:
                    answer_part = answer_part[: len(answer_part) - over]
            if refusal_part is not None:
                refusal_part = refusal_part[: n_max - len(prompt_part)]
        skip = n_prompt - split
        enc = _Encoded(prompt_part, answer_part, refusal_part, skip)
        overlong = len(answer_part) <= skip or (refusal_part is not None and len(refusal_part) <= skip)
        return enc, overlong

    def _refusal_for(self, index: int) -> str | list[int]:
        return self._pool_raw[index % len(self._pool_raw)]

    # ----------------------------------------------------------------------------------------------- examples
    def _checked(self, examples: Any, name: str) -> None:
        if isinstance(examples, Mapping) or not isinstance(examples, Sequence) or isinstance(examples, str):
            raise TypeError(f"{name}: expected a list of example dicts, got {type(examples).__name__}")
        if len(examples) == 0:
            raise ValueError(f"{name}: the example list is empty")

    def _example(self, ex: Any, pos: int, name: str, with_refusal: bool):
        """Validate and encode one example -> (encoded, overlong, index, flag)."""
        if not isinstance(ex, Mapping):
            raise TypeError(f"{name}: example at position {pos} is a {type(ex).__name__}, expected a dict")
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
        flag = ex.get("is_harmful")
        if isinstance(flag, (torch.Tensor, np.bool_)):
            flag = bool(flag)
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name}: example index {idx}: 'is_harmful' must be a bool, got {flag!r}")
        refusal = self._refusal_for(idx) if with_refusal else None
        enc, overlong = self._encode(ex["prompt"], ex["response"], refusal, f"{name}: example index {idx}")
        return enc, overlong, idx, flag

    def _overlong_error(self, name: str, idx: int, enc: _Encoded) -> ValueError:
        return ValueError(
            f"{name}: example index {idx}: truncation={self.truncation!r} to max_length={self.max_length} "
            f"cuts its response{' or refusal' if enc.refusal is not None else ''} away entirely (prompt: "
            f"{len(enc.prompt) + enc.skip} tokens); raise max_length, or pass drop_overlong=True to "
            "drop such samples (collator.split_overlong(examples) filters a dataset up front)"
        )

    def _read(self, examples: Any, name: str, with_refusal: bool, kind: str):
        """Validate and encode examples -> (encoded samples, indices, flags or None, number dropped). Drops
        are recorded under ``kind`` (the list the indices refer to)."""
        self._checked(examples, name)
        encoded, indices, flags, dropped = [], [], [], []
        for pos, ex in enumerate(examples):
            enc, overlong, idx, flag = self._example(ex, pos, name, with_refusal)
            if overlong:
                if not self.drop_overlong:
                    raise self._overlong_error(name, idx, enc)
                dropped.append(idx)
                continue
            encoded.append(enc)
            indices.append(idx)
            flags.append(flag)
        if dropped:
            self.num_dropped += len(dropped)
            self._dropped.setdefault(kind, set()).update(dropped)
        if not encoded:
            raise ValueError(
                f"{name}: every example of the batch is overlong and was dropped (indices {dropped[:10]}); "
                "filter the dataset with collator.split_overlong(examples) before batching"
            )
        have = [f is not None for f in flags]
        if any(have) and not all(have):
            missing = [indices[i] for i, h in enumerate(have) if not h]
            raise ValueError(f"{name}: 'is_harmful' is given for some examples but not for indices {missing}")
        return encoded, indices, (flags if all(have) else None), len(dropped)

    def _split(self, examples: Any, name: str, with_refusal: bool) -> OverlongSplit:
        self._checked(examples, name)
        kept, dropped = [], []
        for pos, ex in enumerate(examples):
            _, overlong, _, _ = self._example(ex, pos, name, with_refusal)
            (dropped if overlong else kept).append(ex)
        return OverlongSplit(kept, dropped)

    def _lm_batch(self, encoded: list[_Encoded], indices, flags, num_dropped: int) -> LMBatch:
        prompts = [e.prompt for e in encoded]
        answers = [e.answer for e in encoded]
        p = max(len(x) for x in prompts)
        ta = max(len(x) for x in answers)
        plens = torch.tensor([len(x) for x in prompts], dtype=torch.long)
        alens = torch.tensor([len(x) for x in answers], dtype=torch.long)
        skips = torch.tensor([e.skip for e in encoded], dtype=torch.long)
        prompt_ids = _pad_rows(prompts, p, self.pad_token_id, left=True)
        answer_ids = _pad_rows(answers, ta, self.pad_token_id, left=False)
        col_p = torch.arange(p)
        col_a = torch.arange(ta)
        prompt_mask = (col_p[None, :] >= (p - plens)[:, None]).long()
        answer_mask = (col_a[None, :] < alens[:, None]).long()
        prompt_pos = (col_p[None, :] - (p - plens)[:, None]).clamp_min(0) * prompt_mask
        answer_pos = (plens[:, None] + col_a[None, :]) * answer_mask
        labelled = (answer_mask == 1) & (col_a[None, :] >= skips[:, None])
        answer_labels = answer_ids.masked_fill(~labelled, IGNORE_INDEX)
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
            num_dropped=num_dropped,
        )

    def _finetune_batch(self, examples: Any, name: str, kind: str) -> FinetuneBatch:
        encoded, indices, flags, num_dropped = self._read(examples, name, with_refusal=True, kind=kind)
        lm = self._lm_batch(encoded, indices, flags, num_dropped)
        refusals = [e.refusal for e in encoded]
        tr = max(len(r) for r in refusals)
        refusal_ids = _pad_rows(refusals, tr, self.pad_token_id, left=False)
        rlens = torch.tensor([len(r) for r in refusals], dtype=torch.long)
        skips = torch.tensor([e.skip for e in encoded], dtype=torch.long)
        cols = torch.arange(tr)[None, :]
        refusal_mask = (cols < rlens[:, None]).long()
        labelled = (refusal_mask == 1) & (cols >= skips[:, None])
        return FinetuneBatch(
            **{k: getattr(lm, k) for k in LMBatch.__dataclass_fields__},
            refusal_ids=refusal_ids,
            refusal_mask=refusal_mask,
            refusal_labels=refusal_ids.masked_fill(~labelled, IGNORE_INDEX),
        )


_ARGS_DOC = """
    Args:
        tokenizer: an HF tokenizer, needed only for text fields and text refusal pools.
        refusals: the refusal pool: strings (e.g. :func:`antibody_fast.data.load_refusals`; tokenized jointly
            with each text prompt, EOS appended) or token-id lists (used as given). Default:
            :data:`antibody_fast.data.DEFAULT_REFUSALS` (text, so it needs a tokenizer). Sample ``i`` gets
            entry ``index_i mod len(pool)``.
        max_length: maximum tokens of prompt + answer (and of prompt + refusal), >= 2. The authors use 256.
        pad_token_id: id written into padding columns (they are masked, so any valid id works). ``None`` takes
            the tokenizer's pad id, else 0.
        truncation: ``"right"`` (default, the authors' rule: the joined sequence is cut on the right) or
            ``"left"`` (the prompt loses its oldest tokens first); see the module docstring.
        drop_overlong: leave out samples whose answer (or refusal) truncation cuts away entirely, counting
            them in ``batch.num_dropped`` and on the collator, instead of raising ``ValueError``.
        max_chars: characters of a text field read before tokenizing (default ``16 * max_length``; the window
            doubles when it holds too few tokens); see the module docstring.

    Attributes:
        num_dropped: samples dropped by ``drop_overlong`` over every call so far (a sample dropped in two
            epochs counts twice; counts only calls in this process, not in DataLoader worker processes).
"""


class FinetuneCollator(_Collator):
    __doc__ = (
        """Collate user samples into a :class:`FinetuneBatch` (sample + refusal on the same prompt).
"""
        + _ARGS_DOC
        + """
    ``collator(examples)`` returns a :class:`FinetuneBatch` on the CPU with ``input_ids``/``attention_mask``/
    ``position_ids``/``labels`` of shape ``[B, P + Ta]`` and ``refusal_*`` of shape ``[B, Tr]`` (all int64).
    Raises ``ValueError`` on an empty list, a missing field (named with the example's index), an empty prompt,
    a response with zero tokens, or an overlong sample (without ``drop_overlong``).
    """
    )

    @property
    def dropped_indices(self) -> set[int]:
        """Dataset indices of the samples dropped so far by ``drop_overlong`` (a copy)."""
        return set(self._dropped.get("examples", ()))

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> FinetuneBatch:
        return self._finetune_batch(examples, "FinetuneCollator", "examples")

    def split_overlong(self, examples: Sequence[Mapping[str, Any]]) -> OverlongSplit:
        """Split a dataset into ``(kept, dropped)`` example lists: ``dropped`` are the overlong samples
        (answer or refusal cut away entirely by truncation). Other bad data raises as in ``__call__``. Tokenizes every
        example once; the collator's counters are not changed."""
        return self._split(examples, "FinetuneCollator", with_refusal=True)


class AlignCollator(_Collator):
    __doc__ = (
        """Collate the alignment stage's data into an :class:`AlignBatch` (docs/design.md §2.2).

    Called as ``collator(align_examples, harmful_examples)``:

    * ``align``: ``align_examples`` as prompt -> response (harmful prompt -> refusal answer);
    * ``harmful``: ``harmful_examples`` as prompt -> response (harmful prompt -> harmful answer);
    * ``refusal``: the same prompts as ``harmful``, each answered by pool entry ``index mod len(pool)``.

    A harmful sample dropped as overlong leaves both ``harmful`` and ``refusal``; ``batch.align.num_dropped``
    and ``batch.harmful.num_dropped`` count the drops of each list, ``collator.dropped_align_indices`` and
    ``collator.dropped_harmful_indices`` name them.
"""
        + _ARGS_DOC
    )

    def __call__(
        self, align_examples: Sequence[Mapping[str, Any]], harmful_examples: Sequence[Mapping[str, Any]]
    ) -> AlignBatch:
        name_a = "AlignCollator (align examples)"
        align = self._lm_batch(*self._read(align_examples, name_a, with_refusal=False, kind="align"))
        harmful = self._finetune_batch(harmful_examples, "AlignCollator (harmful examples)", "harmful")
        return AlignBatch(align=align, harmful=harmful.answer_view(), refusal=harmful.refusal_view())

    def align_batch(self, align_examples: Sequence[Mapping[str, Any]]) -> LMBatch:
        """Only the ``align`` view (harmful prompt -> refusal answer) as an :class:`LMBatch`
        (``[B, P + Ta]`` int64): the batch of safety SFT, Vaccine and Lisa's alignment state, which use no
        harmful answers."""
        name_a = "AlignCollator (align examples)"
        return self._lm_batch(*self._read(align_examples, name_a, with_refusal=False, kind="align"))

    @property
    def dropped_align_indices(self) -> set[int]:
        """Indices of the alignment examples dropped so far by ``drop_overlong`` (a copy)."""
        return set(self._dropped.get("align", ()))

    @property
    def dropped_harmful_indices(self) -> set[int]:
        """Indices of the harmful examples dropped so far by ``drop_overlong`` (a copy)."""
        return set(self._dropped.get("harmful", ()))

    def split_overlong(
        self,
        align_examples: Sequence[Mapping[str, Any]],
        harmful_examples: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[OverlongSplit, OverlongSplit]:
        """``(split of align_examples, split of harmful_examples)``, each ``(kept, dropped)``; see
        :meth:`FinetuneCollator.split_overlong`. Harmful samples count as overlong when their answer or their
        refusal is cut away. ``harmful_examples=None`` (methods that use only the alignment data) gives an empty
        second split."""
        return (
            self._split(align_examples, "AlignCollator (align examples)", with_refusal=False),
            OverlongSplit([], [])
            if harmful_examples is None
            else self._split(harmful_examples, "AlignCollator (harmful examples)", with_refusal=True),
        )
