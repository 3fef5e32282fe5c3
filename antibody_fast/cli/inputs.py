"""A training run's data: prompt templates, the refusal pool, the collator checks made before anything is
written, and the seeded data order.

The data order is defined over the *global* batch: step ``s`` of rank ``r`` in a world of ``W`` processes
reads positions ``(s * W + r) * B ..`` of the infinite sequence of seeded epoch shuffles (:func:`order`), so
``W`` processes with batch ``B`` read exactly what one process with batch ``W * B`` reads.
"""

from __future__ import annotations

import random

from .console import CLIError
from .options import CommonOptions, TrainOptions

__all__ = ["template", "templated", "refusal_pool", "collator_args", "kept", "precheck", "order"]


def template(prompt: str, opts: CommonOptions) -> str:
    """``prompt`` in the Alpaca template (as given with ``--no-template``)."""
    from ..data.loaders import alpaca_prompt

    return prompt if opts.no_template else alpaca_prompt(prompt)


def templated(records: list[dict], opts: CommonOptions) -> list[dict]:
    """Prompt/response records with the prompt template applied and ``index`` = position in the file."""
    return [
        {"prompt": template(e["prompt"], opts), "response": e["response"], "index": i}
        for i, e in enumerate(records)
    ]


def refusal_pool(opts: TrainOptions) -> list[str] | None:
    """``--refusals FILE`` read with :func:`~antibody_fast.data.load_refusals` (``None``: the shipped pool)."""
    if not opts.refusals:
        return None
    from ..data.loaders import load_refusals

    return load_refusals(opts.refusals)


def collator_args(opts: TrainOptions, tokenizer, refusals) -> dict:
    """The collators' keyword arguments for this run."""
    return {
        "tokenizer": tokenizer,
        "refusals": refusals,
        "max_length": opts.max_length,
        "truncation": opts.truncation,
    }


def kept(split, what: str, total: int) -> list:
    """The kept half of a collator's ``split_overlong``; none kept is an error."""
    kept, dropped = split
    if not kept:
        raise CLIError(f"{what}: every one of the {total} samples is overlong (--drop-overlong left none)")
    return kept


def precheck(collate, batches: list, what: str) -> None:
    """Collate every batch once before anything is written, so that data the collator rejects (e.g. a
    response truncated to zero tokens) is reported up front."""
    for args in batches:
        try:
            collate(*args)
        except (ValueError, TypeError) as e:
            raise CLIError(f"{what}: {e}") from None


def order(n: int, seed: int, position: int, count: int) -> list[int]:
    """Positions ``position .. position+count-1`` of the infinite sequence of seeded epoch shuffles of
    ``range(n)`` (epoch e is ``random.Random(seed * 1_000_003 + e)``-shuffled)."""
    out = []
    epoch, offset = divmod(position, n)
    while len(out) < count:
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = perm[offset : offset + count - len(out)]
        out.extend(take)
        epoch, offset = epoch + 1, 0
    return out
