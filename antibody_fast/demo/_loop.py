"""Training-loop helpers shared by the toy demo and the real-model demo."""

from __future__ import annotations

import random

import torch


class Batches:
    """Cycles through the indices ``0 .. n-1`` of a dataset in shuffled epochs (own RNG, deterministic)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n = n
        self.bs = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next_indices(self) -> list[int]:
        out = []
        while len(out) < self.bs:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


def progress_bar(total: int, desc: str, cfg):
    """A tqdm bar, shown unless ``cfg.progress`` is false."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)


def masked_mean(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of ``w`` over the positions where the boolean mask ``m`` is set (NaN when none is)."""
    n = m.sum()
    return torch.where(n > 0, (w * m).sum() / n.clamp_min(1), torch.full_like(w[0], float("nan")))
