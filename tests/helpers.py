"""Shared test factories: tiny models, random token-id examples, ready-made batches.

Import from tests as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``) or
``from tests.helpers import ...``. Everything is seeded and small (CPU, fp32, 2 cores).
"""

from __future__ import annotations

import random

import torch

from antibody_fast.data import AlignBatch, AlignCollator, FinetuneBatch, FinetuneCollator

VOCAB = 128
# ids 0..2 are pad/bos/eos in the tiny configs; random tokens are drawn from [FIRST_ID, vocab)
FIRST_ID = 3

ARCHS = ("llama", "qwen2", "gemma2")


def tiny_model(
    arch: str = "llama",
    *,
    lora: bool = True,
    seed: int = 0,
    lora_seed: int = 1,
    r: int = 4,
    vocab_size: int = VOCAB,
    dtype: torch.dtype = torch.float32,
    **kw,
) -> torch.nn.Module:
    """A tiny randomly initialised causal LM (``arch`` in ARCHS), LoRA-wrapped with non-zero B by default."""
    from antibody_fast import models

    factory = {"llama": models.tiny_llama, "qwen2": models.tiny_qwen2, "gemma2": models.tiny_gemma2}[arch]
    model = factory(vocab_size=vocab_size, seed=seed, dtype=dtype, **kw)
    if lora:
        model = models.add_lora(model, r=r, seed=lora_seed, random_init=True)
    return model


def random_ids(rng: random.Random, n: int, vocab_size: int = VOCAB) -> list[int]:
    return [rng.randrange(FIRST_ID, vocab_size) for _ in range(n)]


def make_examples(
    n: int = 4,
    *,
    seed: int = 0,
    vocab_size: int = VOCAB,
    prompt_len: tuple[int, int] = (2, 7),
    answer_len: tuple[int, int] = (1, 6),
    harmful_every: int | None = 2,
    start_index: int = 0,
) -> list[dict]:
    """``n`` token-id examples with ragged prompt/answer lengths (inclusive ranges).

    With ``harmful_every=k`` every k-th example is flagged ``is_harmful=True`` (others False); ``None`` gives
    no flags at all.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ex = {
            "prompt": random_ids(rng, rng.randint(*prompt_len), vocab_size),
            "response": random_ids(rng, rng.randint(*answer_len), vocab_size),
            "index": start_index + i,
        }
        if harmful_every is not None:
            ex["is_harmful"] = i % harmful_every == 0
        out.append(ex)
    return out


def make_refusal_pool(
    n: int = 5, *, seed: int = 100, vocab_size: int = VOCAB, length: tuple[int, int] = (2, 5)
) -> list[list[int]]:
    """A token-id refusal pool of ``n`` ragged entries."""
    rng = random.Random(seed)
    return [random_ids(rng, rng.randint(*length), vocab_size) for _ in range(n)]


def make_finetune_batch(
    n: int = 4, *, seed: int = 0, vocab_size: int = VOCAB, pool: list[list[int]] | None = None, **example_kw
) -> FinetuneBatch:
    """A FinetuneBatch of ``n`` random token-id examples with a random token-id refusal pool."""
    pool = pool if pool is not None else make_refusal_pool(vocab_size=vocab_size, seed=seed + 100)
    collator = FinetuneCollator(refusals=pool)
    return collator(make_examples(n, seed=seed, vocab_size=vocab_size, **example_kw))


def make_align_batch(
    n_align: int = 3,
    n_harmful: int = 3,
    *,
    seed: int = 0,
    vocab_size: int = VOCAB,
    pool: list[list[int]] | None = None,
) -> AlignBatch:
    """An AlignBatch: A (prompt -> refusal-like answer), H (harmful prompt -> answer) and R (H's prompts -> pool)."""
    pool = pool if pool is not None else make_refusal_pool(vocab_size=vocab_size, seed=seed + 100)
    collator = AlignCollator(refusals=pool)
    align = make_examples(n_align, seed=seed + 1, vocab_size=vocab_size, harmful_every=None)
    harmful = make_examples(n_harmful, seed=seed + 2, vocab_size=vocab_size, harmful_every=1)
    return collator(align, harmful)


def trainable_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of the trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer (to check that nothing changed)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise equality of two state dicts."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def unpadded_logprob(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """``log p(answer | prompt)`` (float64 sum) from one unpadded forward of a single sample."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp.gather(-1, torch.tensor(answer)[:, None]).sum()


def join_spawned(ctx, timeout_s: float, what: str) -> None:
    """Wait for ``torch.multiprocessing.spawn(..., join=False)``'s workers: a worker's exception is re-raised;
    after ``timeout_s`` every worker is killed and the test fails (a collective mismatch hangs)."""
    import time

    import pytest

    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{what} did not finish within {timeout_s} s (collective mismatch?)")
