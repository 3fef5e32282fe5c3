"""Tokenization and truncation of one sample into the prompt-aligned layout of
:mod:`antibody_fast.data.batch`: :class:`SampleEncoder`, used by the collators of
:mod:`antibody_fast.data.collate` (which validate its arguments, pad and batch).

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

**Bounded reading.** Only the first ``max_chars`` characters of a text field are tokenized (for
``"left"``, the prompt's last ones), cut at a whitespace; default ``max_chars = 16 * max_length``, so a 5 MB
record does not cost a 5 MB tokenization. When those characters hold fewer than ``max_length + 16`` tokens,
the window doubles and the field is tokenized again. The kept tokens are then those of the whole text
whenever the cut changes no token more than 16 tokens away from it (true of tokenizers whose tokens do not
span the whitespace the cut is made at, i.e. that split text into words first).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .refusals import DEFAULT_REFUSALS

__all__ = ["SampleEncoder", "Encoded", "TRUNCATION_SIDES", "CHARS_PER_TOKEN", "is_int"]

TRUNCATION_SIDES = ("right", "left")
# tokens beyond max_length that a character window must hold before its cut is trusted not to matter
_CUT_MARGIN = 16
# default characters per token of max_length read from a text field before tokenizing
CHARS_PER_TOKEN = 16


def is_int(x: Any) -> bool:
    """Whether ``x`` is an integer (numpy's too), and not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


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


class Encoded(NamedTuple):
    """One sample in the prompt-aligned layout, before padding."""

    prompt: list[int]
    answer: list[int]
    refusal: list[int] | None
    skip: int  # leading answer / refusal tokens labelled -100 (the authors' split counts them as prompt)


class SampleEncoder:
    """One sample (prompt, answer, optional refusal) -> its :class:`Encoded` layout and whether it is overlong
    (see the module docstring).

    Args:
        tokenizer: an HF tokenizer (needed only for text), or ``None``.
        refusals: the refusal pool (strings or token-id lists; ``None``: the shipped pool, text).
        max_length, truncation, max_chars: as the collators take them, already validated by the collator.

    Attributes:
        pool: the refusal pool as token ids (a text refusal tokenized on its own, EOS appended).
    """

    def __init__(self, tokenizer, refusals, *, max_length: int, truncation: str, max_chars: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.max_chars = max_chars
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
        self.pool: list[list[int]] = self._encode_pool(pool, default=refusals is None)

    def _check_ids(self, ids: Sequence[Any], what: str) -> list[int]:
        out = []
        for t in ids:
            if not is_int(t):
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

    def encode(self, prompt: Any, answer: Any, refusal: Any, what: str) -> tuple[Encoded, bool]:
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
        enc = Encoded(prompt_part, answer_part, refusal_part, skip)
        overlong = len(answer_part) <= skip or (refusal_part is not None and len(refusal_part) <= skip)
        return enc, overlong

    def refusal_for(self, index: int) -> str | list[int]:
        """The refusal of sample ``index``: pool entry ``index mod len(pool)``, as given (text or ids)."""
        return self._pool_raw[index % len(self._pool_raw)]
