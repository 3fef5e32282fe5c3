"""Embedded CPU demo: the whole defense end to end on a tiny Llama and a synthetic instruction language.

``antibody-fast demo [options]`` or ``python -m antibody_fast.demo [options]``: no GPU, no download. Trains a
tiny Llama from scratch on a synthetic token-id language (stage 0), aligns it with SFT, Vaccine, Booster and
Antibody (stage 1), fine-tunes it on a user set with harmful samples with SFT, Lisa or Antibody's
``weighted_step`` (stage 2), and reports the harmful score (HS) and fine-tune accuracy (FA) of every method
with its time per step: a Markdown table, a JSON report and PNG plots. See :mod:`antibody_fast.demo.run`.

Importing this package is cheap; the demo's dependencies (transformers, matplotlib, tqdm) load when it runs.
"""

from __future__ import annotations

from ._args import add_overrides
from .cli import build_parser, config_from_args, main

__all__ = ["main", "build_parser", "config_from_args", "add_overrides"]
