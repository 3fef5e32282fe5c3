"""Batch dataclasses shared by the collators, the lean steps and the reference algorithm.

Every batch is *prompt-aligned*: prompts are left-padded to ``P = prompt_len`` columns and answers are
right-padded after them, so every answer starts at column ``P``. Position ids are explicit (each sample counts
from 0 at its first real prompt token; padding gets position 0), so a left-padded sample sees exactly the
positions it would see unpadded. This layout lets the refusal be scored as a continuation of the prompt's
key/value cache cropped to ``P`` columns (docs/design.md §3).

Labels follow the Hugging Face convention: unshifted (the model or loss shifts them), ``-100`` on prompt and
padding columns, the answer's token ids elsewhere. The first columns of an answer (or refusal) region may also
hold ``-100``: tokens that the authors' joint tokenization counts as prompt but that the completion and the
refusal of a sample do not share (a tokenizer that merges the prompt's end with the answer's start; see
:mod:`antibody_fast.data.collate`). Losses and log-likelihoods count labelled tokens only, so this is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "LMBatch", "FinetuneBatch", "AlignBatch"]


def _move(value, device, non_blocking: bool):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    return value


@dataclass
class LMBatch:
    """One prompt -> answer batch, prompt-aligned.

    Attributes:
        input_ids: ``[B, P + Ta]`` int64. Prompt left-padded to ``P`` columns, answer right-padded.
        attention_mask: ``[B, P + Ta]`` int64, 1 on real tokens, 0 on padding.
        position_ids: ``[B, P + Ta]`` int64. Prompt tokens ``0 .. len_i - 1``, answer tokens continue at
            ``len_i``; padding columns hold 0.
        labels: ``[B, P + Ta]`` int64, HF convention (unshifted): ``-100`` on prompt and padding (and on the
            leading answer-region tokens the authors' split counts as prompt, if any), answer ids elsewhere.
        prompt_len: ``P``, a Python int (a shape, not data).
        prompt_lengths: ``[B]`` int64 real prompt lengths (each ``>= 1``).
        index: ``[B]`` int64 dataset positions of the samples.
        is_harmful: ``[B]`` bool flags or ``None``; used for reports only, never by the algorithm.
        num_dropped: how many overlong samples the collator left out of this batch (``drop_overlong=True``),
            a Python int for reports; 0 otherwise.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    prompt_len: int
    prompt_lengths: torch.Tensor
    index: torch.Tensor
    is_harmful: torch.Tensor | None = None
    num_dropped: int = 0

    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def num_answer_tokens(self) -> torch.Tensor:
        """``[B]`` int64: number of labelled (answer) tokens of each sample."""
        return (self.labels != IGNORE_INDEX).sum(dim=1)

    def to(self, device, non_blocking: bool = False):
        """A copy of the batch with every tensor moved to ``device`` (same class)."""
        return replace(
            self, **{f.name: _move(getattr(self, f.name), device, non_blocking) for f in fields(self)}
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` as keyword arguments for an HF model."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


@dataclass
class FinetuneBatch(LMBatch):
    """A fine-tuning batch: user samples plus, for each, a refusal on the same prompt.

    Attributes (in addition to :class:`LMBatch`):
        refusal_ids: ``[B, Tr]`` int64 refusal tokens, right-padded. They continue the prompt, i.e. they would
            sit at columns ``P .. P + Tr - 1``.
        refusal_mask: ``[B, Tr]`` int64, 1 on real refusal tokens.
        refusal_labels: ``[B, Tr]`` int64 = ``refusal_ids`` with ``-100`` on padding (and on leading tokens
            the authors' split counts as prompt, if any; see the module docstring). These are the target ids
            of the refusal positions themselves (not shifted): the first refusal token is predicted by the
            prompt's last column ``P - 1``.
    """

    refusal_ids: torch.Tensor = None  # type: ignore[assignment]
    refusal_mask: torch.Tensor = None  # type: ignore[assignment]
    refusal_labels: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.refusal_ids is None or self.refusal_mask is None or self.refusal_labels is None:
            raise ValueError("FinetuneBatch needs refusal_ids, refusal_mask and refusal_labels")

    @property
    def num_refusal_tokens(self) -> torch.Tensor:
        """``[B]`` int64: number of refusal tokens of each sample."""
        return (self.refusal_labels != IGNORE_INDEX).sum(dim=1)

    def refusal_positions(self) -> torch.Tensor:
        """``[B, Tr]`` int64 position ids of the refusal tokens (``prompt_lengths[:, None] + arange(Tr)``,
        0 on padding)."""
        tr = self.refusal_ids.shape[1]
        pos = self.prompt_lengths[:, None] + torch.arange(tr, device=self.refusal_ids.device)
        return pos * self.refusal_mask

    def answer_view(self) -> LMBatch:
        """The user samples as a plain :class:`LMBatch` (no refusal fields; tensors shared)."""
        return LMBatch(**{f.name: getattr(self, f.name) for f in fields(LMBatch)})

    def refusal_view(self) -> LMBatch:
        """The same prompts with the refusal as answer: ``[B, P + Tr]`` prompt-aligned batch.

        Used for "full" refusal scoring and by the reference algorithm.
        """
        p = self.prompt_len
        b = self.input_ids.shape[0]
        prompt_labels = torch.full((b, p), IGNORE_INDEX, dtype=self.labels.dtype, device=self.labels.device)
        return LMBatch(
            input_ids=torch.cat([self.input_ids[:, :p], self.refusal_ids], dim=1),
            attention_mask=torch.cat([self.attention_mask[:, :p], self.refusal_mask], dim=1),
            position_ids=torch.cat([self.position_ids[:, :p], self.refusal_positions()], dim=1),
            labels=torch.cat([prompt_labels, self.refusal_labels], dim=1),
            prompt_len=p,
            prompt_lengths=self.prompt_lengths,
            index=self.index,
            is_harmful=self.is_harmful,
            num_dropped=self.num_dropped,
        )


@dataclass
class AlignBatch:
    """One alignment step's data (docs/design.md §2.2).

    Attributes:
        align: A, harmful prompt -> refusal answer (the alignment data).
        harmful: H, harmful prompt -> harmful answer.
        refusal: R, the same prompts as ``harmful`` -> a refusal from the pool (entry ``index mod len(pool)``).
    """

    align: LMBatch
    harmful: LMBatch
    refusal: LMBatch

    def to(self, device, non_blocking: bool = False) -> AlignBatch:
        """A copy with every batch moved to ``device``."""
        return AlignBatch(
            align=self.align.to(device, non_blocking),
            harmful=self.harmful.to(device, non_blocking),
            refusal=self.refusal.to(device, non_blocking),
        )

    @property
    def device(self) -> torch.device:
        return self.align.device
