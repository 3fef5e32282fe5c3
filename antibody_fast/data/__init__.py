"""Data: prompt-aligned batch dataclasses, collators, loaders and the shipped refusal pool.

Imports neither ``datasets`` nor ``transformers``: collators take any callable HF tokenizer, or none at all
for token-id examples.
"""

from .batch import IGNORE_INDEX, AlignBatch, FinetuneBatch, LMBatch
from .collate import TRUNCATION_SIDES, AlignCollator, FinetuneCollator, OverlongSplit
from .loaders import (
    DataError,
    alpaca_prompt,
    build_poisoned_set,
    load_alignment,
    load_harmful,
    load_refusals,
    load_task,
    read_records,
)
from .refusals import DEFAULT_REFUSALS

__all__ = [
    "IGNORE_INDEX",
    "LMBatch",
    "FinetuneBatch",
    "AlignBatch",
    "FinetuneCollator",
    "AlignCollator",
    "OverlongSplit",
    "TRUNCATION_SIDES",
    "DEFAULT_REFUSALS",
    "DataError",
    "alpaca_prompt",
    "build_poisoned_set",
    "load_alignment",
    "load_harmful",
    "load_refusals",
    "load_task",
    "read_records",
]
