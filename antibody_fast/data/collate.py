"""Collators that build prompt-aligned batches (see :mod:`antibody_fast.data.batch`).

Examples are mappings ``{"prompt": str | list[int], "response": str | list[int], "index": int,
"is_harmful": bool (optional)}``.

A sample whose answer (or refusal) keeps no labelled token after truncation is *overlong*: the collator raises
a ``ValueError`` naming it, or, with ``drop_overlong=True``, leaves it out of the batch. Dropped samples are
counted on the batch (``batch.num_dropped``) and on the collator (``collator.num_dropped``, and
``collator.dropped_indices`` or ``dropped_align_indices`` / ``dropped_harmful_indices``). For training,
filter the dataset once up front with :meth:`FinetuneCollator.split_overlong` /
:meth:`AlignCollator.split_overlong`, so that every batch keeps its size.

Sample ``i`` gets refusal pool entry ``index_i mod len(pool)``, fixed across epochs (the authors' rule).
Tensors are built on the CPU; move a batch with ``batch.to(device)``.

Tokenization and truncation (the authors' recipe, shared prompt columns, bounded reading) are
:mod:`antibody_fast.data.encoding`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .batch import IGNORE_INDEX, AlignBatch, FinetuneBatch, LMBatch
from .encoding import CHARS_PER_TOKEN, TRUNCATION_SIDES, Encoded, SampleEncoder, is_int

__all__ = ["FinetuneCollator", "AlignCollator", "OverlongSplit", "TRUNCATION_SIDES"]


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


class OverlongSplit(NamedTuple):
    """Result of ``split_overlong``: the examples that fit and those whose answer truncation cuts away."""

    kept: list
    dropped: list


class _Collator:
    """Shared validation, overlong handling, padding and batching (see the module docstring); each sample is
    tokenized and truncated by a :class:`~antibody_fast.data.encoding.SampleEncoder`."""

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
        if not is_int(max_length) or max_length < 2:
            raise ValueError(
                f"max_length must be an int >= 2 (one prompt and one answer token), got {max_length!r}"
            )
        if truncation not in TRUNCATION_SIDES:
            raise ValueError(f"truncation must be one of {TRUNCATION_SIDES}, got {truncation!r}")
        if not isinstance(drop_overlong, bool):
            raise TypeError(f"drop_overlong must be a bool, got {drop_overlong!r}")
        if max_chars is None:
            max_chars = CHARS_PER_TOKEN * int(max_length)
        if not is_int(max_chars) or max_chars < 1:
            raise ValueError(f"max_chars must be a positive int or None, got {max_chars!r}")
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
            pad_token_id = 0 if pad_token_id is None else pad_token_id
        if not is_int(pad_token_id) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self.truncation = truncation
        self.drop_overlong = drop_overlong
        self.max_chars = int(max_chars)
        self.num_dropped = 0
        self._dropped: dict[str, set[int]] = {}
        self.encoder = SampleEncoder(
            tokenizer, refusals, max_length=self.max_length, truncation=truncation, max_chars=self.max_chars
        )
        self.refusal_pool: list[list[int]] = self.encoder.pool

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
        if not is_int(idx) or idx < 0:
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
        refusal = self.encoder.refusal_for(idx) if with_refusal else None
        enc, overlong = self.encoder.encode(
            ex["prompt"], ex["response"], refusal, f"{name}: example index {idx}"
        )
        return enc, overlong, idx, flag

    def _overlong_error(self, name: str, idx: int, enc: Encoded) -> ValueError:
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

    def _lm_batch(self, encoded: list[Encoded], indices, flags, num_dropped: int) -> LMBatch:
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
