"""Joint tokenization of text samples against the authors' rule; truncation, overlong samples, bounded reading.

The oracle is a naive port of the authors' preprocessing: tokenize ``prompt + answer + eos_token`` as one text
and ``prompt`` alone, both truncated on the right at ``max_length``; the first ``len(tokenize(prompt))``
labels are -100 (they count the tokens that differ from the pad id). The tokenizer is SentencePiece-style with a
prefix space, built offline (tests/tokenizer_helpers.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from tokenizer_helpers import sentencepiece_style_tokenizer  # noqa: E402

from antibody_fast.data import AlignCollator, FinetuneCollator, LMBatch, alpaca_prompt  # noqa: E402

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return sentencepiece_style_tokenizer()


def authors_tokenize(tok, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """Naive port of the authors' ``preprocess``: (input_ids, labels) of one sample."""

    def tokenize(text):
        out = tok(text, return_tensors="pt", padding="longest", max_length=max_length, truncation=True)
        return out.input_ids[0], out.input_ids.ne(tok.pad_token_id).sum().item()

    input_ids, _ = tokenize(prompt + target + tok.eos_token)
    _, source_len = tokenize(prompt)
    labels = copy.deepcopy(input_ids)
    labels[:source_len] = IGNORE
    return input_ids.tolist(), labels.tolist()


def row(batch: LMBatch, i: int) -> tuple[list[int], list[int]]:
    """Sample ``i`` of a prompt-aligned batch without its padding: (input_ids, labels)."""
    keep = batch.attention_mask[i].bool()
    return batch.input_ids[i][keep].tolist(), batch.labels[i][keep].tolist()


ALPACA = [
    alpaca_prompt("How to bake bread?"),
    alpaca_prompt("Name a colour.", "It is sunny today"),
    alpaca_prompt("Add one."),
]
# a prompt that ends in a space: the tokenizer merges it with the answer's first word
SPACE = ["Question: How to bake bread? Answer: ", "Question: Name a colour. Answer: "]
ANSWERS = [
    "I can't help with that.",
    "Here is a recipe: flour, water, yeast and salt.",
    "Blue",
    "Sorry, no.",
    "I cannot help with the weather today, sorry.",
]
REFUSALS = ["I can't help with that.", "Sorry, I cannot help with that request.", "No."]


def examples(prompts):
    out = []
    for i, p in enumerate(prompts * 2):
        out.append({"prompt": p, "response": ANSWERS[i % len(ANSWERS)], "index": 3 * i + 1})
    return out


def test_first_answer_token_is_the_joint_one(tok):
    """Llama-2-style boundary: after the template's "\\n" the joint text gives 'I', the answer alone '▁I'."""
    prompt, answer = ALPACA[0], "I can't help with that."
    batch = FinetuneCollator(tok, refusals=REFUSALS)([{"prompt": prompt, "response": answer, "index": 0}])
    p = batch.prompt_len
    first = batch.input_ids[0, p].item()
    assert tok.convert_ids_to_tokens(first) == "I"
    assert batch.labels[0, p].item() == first
    alone = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone[0]) == "▁I"  # what tokenizing the answer on its own gave
    ids, labels = authors_tokenize(tok, prompt, answer, 256)
    assert row(batch, 0) == (ids, labels)
    # the refusal pool entry 0 ("I can't ...") starts with the joint 'I' too
    assert tok.convert_ids_to_tokens(batch.refusal_ids[0, 0].item()) == "I"


@pytest.mark.parametrize(
    "prompts, max_length",
    [(ALPACA, 256), (ALPACA, 45), (ALPACA, 36), (SPACE, 256), (SPACE, 20), (SPACE, 12)],
    ids=["alpaca-256", "alpaca-45", "alpaca-36", "space-256", "space-20", "space-12"],
)
def test_finetune_matches_authors(tok, prompts, max_length):
    """Completion and refusal views equal the authors' token ids and labels, sample by sample; samples whose
    answer or refusal the authors' truncation leaves with no label are dropped (prompt lengths: Alpaca 38, 85,
    34 tokens; trailing space 14, 10)."""
    exs = examples(prompts)
    collator = FinetuneCollator(tok, refusals=REFUSALS, max_length=max_length, drop_overlong=True)
    expected, dropped = [], []
    for ex in exs:
        refusal = REFUSALS[ex["index"] % len(REFUSALS)]
        comp = authors_tokenize(tok, ex["prompt"], ex["response"], max_length)
        ref = authors_tokenize(tok, ex["prompt"], refusal, max_length)
        if all(x == IGNORE for x in comp[1]) or all(x == IGNORE for x in ref[1]):
            dropped.append(ex["index"])
        else:
            expected.append((ex["index"], comp, ref))
    assert expected
    if max_length < 256:  # these cases truncate: some sequences end at max_length
        assert any(len(comp[0]) == max_length for _, comp, _ in expected)
    batch = collator(exs)
    assert batch.index.tolist() == [i for i, _, _ in expected]
    assert batch.num_dropped == len(dropped) and collator.dropped_indices == set(dropped)
    view = batch.refusal_view()
    p = batch.prompt_len
    for i, (_, comp, ref) in enumerate(expected):
        assert row(batch, i) == comp
        assert row(view, i) == ref
        # both views share the prompt columns, so the refusal can continue the prompt's cache
        assert torch.equal(view.input_ids[i, :p], batch.input_ids[i, :p])
    # the split (the kept / dropped lists) agrees with what the batch dropped
    kept, gone = collator.split_overlong(exs)
    assert [e["index"] for e in gone] == dropped and len(kept) == len(expected)


def test_trailing_space_shares_the_common_prefix(tok):
    """A prompt ending in a space: the authors mask '▁I' (it falls inside len(tokenize(prompt))); the refusal
    view differs at that token, so it sits in the answer region with label -100 and the prompt columns hold
    the common prefix only."""
    prompt = SPACE[0]
    batch = FinetuneCollator(tok, refusals=["Sorry, no."])(
        [{"prompt": prompt, "response": "I can't help with that.", "index": 0}]
    )
    n_prompt = len(tok(prompt)["input_ids"])
    assert tok.convert_ids_to_tokens(tok(prompt)["input_ids"])[-1] == "▁"
    assert batch.prompt_lengths.tolist() == [n_prompt - 1]
    p = batch.prompt_len
    assert tok.convert_ids_to_tokens(batch.input_ids[0, p].item()) == "▁I"
    assert batch.labels[0, p].item() == IGNORE and batch.labels[0, p + 1].item() != IGNORE
    assert tok.convert_ids_to_tokens(batch.refusal_ids[0, 0].item()) == "▁Sorry"
    assert batch.refusal_labels[0, 0].item() == IGNORE and batch.refusal_labels[0, 1].item() != IGNORE
    assert row(batch, 0) == authors_tokenize(tok, prompt, "I can't help with that.", 256)
    assert row(batch.refusal_view(), 0) == authors_tokenize(tok, prompt, "Sorry, no.", 256)


@pytest.mark.parametrize("max_length", [256, 45])
def test_align_collator_matches_authors(tok, max_length):
    align = [{"prompt": p, "response": "I cannot help with that.", "index": i} for i, p in enumerate(ALPACA)]
    harmful = examples(ALPACA[:2])
    batch = AlignCollator(tok, refusals=REFUSALS, max_length=max_length, drop_overlong=True)(align, harmful)
    assert batch.align.num_dropped == (1 if max_length == 45 else 0)  # the 85-token prompt
    for i, idx in enumerate(batch.align.index.tolist()):
        ex = align[idx]
        assert row(batch.align, i) == authors_tokenize(tok, ex["prompt"], ex["response"], max_length)
    by_index = {e["index"]: e for e in harmful}
    for i, idx in enumerate(batch.harmful.index.tolist()):
        ex = by_index[idx]
        assert row(batch.harmful, i) == authors_tokenize(tok, ex["prompt"], ex["response"], max_length)
        want = authors_tokenize(tok, ex["prompt"], REFUSALS[idx % len(REFUSALS)], max_length)
        assert row(batch.refusal, i) == want


def test_overlong_raises_unless_dropped(tok):
    long_prompt = alpaca_prompt("How to bake bread? " * 20)
    exs = [
        {"prompt": ALPACA[0], "response": "Blue", "index": 0},
        {"prompt": long_prompt, "response": "Blue", "index": 5},
    ]
    with pytest.raises(ValueError, match=r"example index 5: truncation='right' to max_length=64 cuts"):
        FinetuneCollator(tok, refusals=REFUSALS, max_length=64)(exs)
    c = FinetuneCollator(tok, refusals=REFUSALS, max_length=64, drop_overlong=True)
    b = c(exs)
    assert b.index.tolist() == [0] and b.num_dropped == 1
    c(exs)
    assert c.num_dropped == 2 and c.dropped_indices == {5}  # per call; indices are distinct
    kept, dropped = c.split_overlong(exs)
    assert kept == exs[:1] and dropped == exs[1:]
    assert c.num_dropped == 2  # split_overlong does not count
    with pytest.raises(ValueError, match="every example of the batch is overlong"):
        c(exs[1:])
    # left truncation keeps today's behaviour: the prompt loses its oldest tokens, nothing is overlong
    b = FinetuneCollator(tok, refusals=REFUSALS, max_length=64, truncation="left")(exs)
    assert b.index.tolist() == [0, 5] and b.num_dropped == 0
    assert int(b.attention_mask[1].sum()) == 64
    ac = AlignCollator(tok, refusals=REFUSALS, max_length=64, drop_overlong=True)
    ab = ac(exs, [dict(e, index=e["index"] + 100) for e in exs])
    assert ab.align.num_dropped == 1 and ab.harmful.num_dropped == 1 and ab.refusal.num_dropped == 1
    assert ac.num_dropped == 2 and ac.dropped_align_indices == {5} and ac.dropped_harmful_indices == {105}
    (a_kept, a_drop), (h_kept, h_drop) = AlignCollator(tok, refusals=REFUSALS, max_length=64).split_overlong(
        exs, exs
    )
    assert a_drop == h_drop == exs[1:]


def test_token_ids_right_truncation():
    c = FinetuneCollator(refusals=[[50, 51, 52, 53, 54, 55]], max_length=6)
    b = c([{"prompt": [3, 4, 5, 6], "response": [7, 8, 9], "index": 0}])
    # the joined sequence is cut on the right; the prompt keeps BOS / template tokens
    assert b.input_ids.tolist() == [[3, 4, 5, 6, 7, 8]]
    assert b.labels.tolist() == [[IGNORE] * 4 + [7, 8]]
    assert b.refusal_ids.tolist() == [[50, 51]]
    with pytest.raises(ValueError, match="cuts its response or refusal away entirely"):
        c([{"prompt": [3, 4, 5, 6, 7, 8], "response": [9], "index": 0}])


def test_bad_options():
    with pytest.raises(ValueError, match="truncation"):
        FinetuneCollator(refusals=[[3]], truncation="middle")
    with pytest.raises(TypeError, match="drop_overlong"):
        FinetuneCollator(refusals=[[3]], drop_overlong="yes")
    with pytest.raises(ValueError, match="max_chars"):
        FinetuneCollator(refusals=[[3]], max_chars=0)


# ------------------------------------------------------------------------------------------ bounded reading
class CountingTokenizer:
    """Wraps a tokenizer and records the length of every text it is asked to tokenize."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id
        self.seen: list[int] = []

    def __len__(self):
        return len(self.tok)

    def __call__(self, text, **kw):
        self.seen.append(len(text))
        return self.tok(text, **kw)


def test_bounded_reading_of_huge_records(tok):
    """A 5 MB record: the tokenizer reads at most max_chars of each text field, whatever the record's size."""
    counting = CountingTokenizer(tok)
    huge = "flour water yeast salt " * 220_000  # ~5 MB
    max_length = 64
    c = FinetuneCollator(counting, refusals=REFUSALS, max_length=max_length, drop_overlong=True)
    bound = 16 * max_length
    assert c.max_chars == bound
    counting.seen.clear()
    b = c(
        [
            {"prompt": huge, "response": "Blue", "index": 0},  # prompt fills max_length: dropped
            {"prompt": ALPACA[0], "response": huge, "index": 1},  # answer cut by truncation
        ]
    )
    assert b.index.tolist() == [1] and b.num_dropped == 1
    assert max(counting.seen) <= len(ALPACA[0]) + bound
    assert counting.seen[0] <= bound  # the huge prompt's head
    # the same tokens as the whole text would give
    ids, labels = authors_tokenize(tok, ALPACA[0], "flour water yeast salt " * 300, max_length)
    assert row(b, 0) == (ids, labels)
    # left truncation reads the prompt's tail
    counting.seen.clear()
    left = FinetuneCollator(counting, refusals=REFUSALS, max_length=max_length, truncation="left")
    b = left([{"prompt": huge + ALPACA[0], "response": "Blue", "index": 0}])
    assert max(counting.seen) <= 2 * bound
    assert int(b.attention_mask[0].sum()) == max_length
    # the same batch as reading everything (on a record small enough to read whole)
    full = FinetuneCollator(tok, refusals=REFUSALS, max_length=max_length, truncation="left", max_chars=10**8)
    small = "flour water yeast salt " * 2000 + ALPACA[0]
    assert torch.equal(left([{"prompt": small, "response": "Blue", "index": 0}]).input_ids,
                       full([{"prompt": small, "response": "Blue", "index": 0}]).input_ids)  # fmt: skip


@pytest.mark.parametrize("truncation", ["right", "left"])
def test_huge_record_adds_bounded_memory(tok, truncation):
    """Collating a 5 MB record (as prompt, answer and refusal) allocates far less than 50 MB: the text is cut
    by characters before it is tokenized, whatever side the truncation keeps."""
    import tracemalloc

    huge = "flour water yeast salt " * 220_000  # ~5 MB
    exs = [
        {"prompt": huge, "response": "Blue", "index": 0},
        {"prompt": ALPACA[0], "response": huge, "index": 1},
    ]
    tracemalloc.start()  # sees Python's allocations (the token-id lists), not the Rust tokenizer's own
    try:
        c = FinetuneCollator(tok, refusals=[huge], max_length=64, truncation=truncation, drop_overlong=True)
        c(exs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # reading the whole text (max_chars=10**8): ~58 MB of Python objects here; bounded: well under 1 MB
    assert peak < 16 * 2**20, f"collating a 5 MB record peaked at {peak / 2**20:.1f} MB"


@pytest.mark.parametrize("truncation", ["right", "left"])
def test_bounded_reading_is_exact(tok, truncation):
    """A tiny character window (so it must grow) gives the same batch as reading everything."""
    text = "Here is a recipe: flour, water, yeast and salt. It is sunny today. " * 40
    exs = [
        {"prompt": ALPACA[1], "response": text, "index": 0},
        {"prompt": text + ALPACA[0], "response": "I can't help with that.", "index": 1},
        {"prompt": ALPACA[2], "response": "Blue", "index": 2},
    ]
    pool = REFUSALS + [text]
    kw = dict(refusals=pool, max_length=48, truncation=truncation, drop_overlong=True)
    counting = CountingTokenizer(tok)
    small = FinetuneCollator(counting, max_chars=8, **kw)
    big = FinetuneCollator(tok, max_chars=10**8, **kw)
    a, b = small(exs), big(exs)
    for f in (
        "input_ids",
        "labels",
        "attention_mask",
        "position_ids",
        "refusal_ids",
        "refusal_labels",
        "index",
    ):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.num_dropped == b.num_dropped
    assert max(counting.seen) < len(text)  # the window grew, but never to the whole text


# ------------------------------------------------------------------------------------------------ on a model
def authors_mean_logprob(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Per-token mean log-likelihood of the labelled tokens of one unpadded authors' sequence (float64)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    target = torch.tensor(labels[1:])
    keep = target != IGNORE
    return logp[keep].gather(-1, target[keep][:, None]).mean()


@pytest.mark.parametrize("scoring", ["prefix_cache", "full"])
def test_steps_score_the_authors_sequences(tok, scoring):
    """weighted_step's completion and refusal log-likelihoods on joint-tokenized text equal the authors'
    views, including the trailing-space prompt whose answer and refusal regions start with a masked token."""
    from helpers import tiny_model

    from antibody_fast.steps import FinetuneConfig, weighted_step
    from antibody_fast.testing import assert_close

    model = tiny_model("llama", vocab_size=len(tok))
    exs = examples([ALPACA[0], SPACE[0], SPACE[1]])
    batch = FinetuneCollator(tok, refusals=REFUSALS, max_length=48)(exs)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    want_c, want_r = [], []
    for ex in exs:
        refusal = REFUSALS[ex["index"] % len(REFUSALS)]
        want_c.append(authors_mean_logprob(model, *authors_tokenize(tok, ex["prompt"], ex["response"], 48)))
        want_r.append(authors_mean_logprob(model, *authors_tokenize(tok, ex["prompt"], refusal, 48)))
    stats = weighted_step(model, batch, opt, FinetuneConfig(refusal_scoring=scoring))
    assert_close(stats.completion_logprob.double(), torch.stack(want_c), dtype_for_tol=torch.float32,
                 name="completion logprob")  # fmt: skip
    assert_close(stats.refusal_logprob.double(), torch.stack(want_r), dtype_for_tol=torch.float32,
                 name="refusal logprob")  # fmt: skip
