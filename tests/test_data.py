"""Collators, batch layout, refusal pool, and the prompt-aligned / prefix-cache plan on tiny models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import VOCAB, make_examples, make_refusal_pool, tiny_model, unpadded_logprob

from antibody_fast.data import (
    DEFAULT_REFUSALS,
    AlignBatch,
    AlignCollator,
    FinetuneBatch,
    FinetuneCollator,
    LMBatch,
)
from antibody_fast.models import get_trunk_and_head
from antibody_fast.reference import sequence_logprobs
from antibody_fast.testing import assert_close

# ------------------------------------------------------------------------------------------------ layout


def _check_row(batch: LMBatch, i: int, prompt: list[int], answer: list[int], pad: int) -> None:
    p = batch.prompt_len
    lp, la = len(prompt), len(answer)
    width = batch.input_ids.shape[1]
    ids = batch.input_ids[i].tolist()
    assert ids[p - lp : p] == prompt
    assert ids[p : p + la] == answer
    assert ids[: p - lp] == [pad] * (p - lp)
    assert ids[p + la :] == [pad] * (width - p - la)
    mask = batch.attention_mask[i].tolist()
    assert mask == [0] * (p - lp) + [1] * (lp + la) + [0] * (width - p - la)
    pos = batch.position_ids[i].tolist()
    assert pos == [0] * (p - lp) + list(range(lp + la)) + [0] * (width - p - la)
    labels = batch.labels[i].tolist()
    assert labels == [-100] * p + answer + [-100] * (width - p - la)
    assert int(batch.prompt_lengths[i]) == lp


def test_finetune_layout_prompt_aligned():
    examples = make_examples(5, seed=3, prompt_len=(1, 6), answer_len=(1, 5))
    pool = make_refusal_pool(3, seed=7)
    examples[2]["index"] = 10  # 10 mod 3 = 1
    batch = FinetuneCollator(refusals=pool, pad_token_id=1)(examples)
    assert isinstance(batch, FinetuneBatch)
    b = len(examples)
    p = max(len(e["prompt"]) for e in examples)
    ta = max(len(e["response"]) for e in examples)
    assert batch.prompt_len == p
    assert batch.input_ids.shape == (b, p + ta)
    for t in (batch.input_ids, batch.attention_mask, batch.position_ids, batch.labels, batch.refusal_ids):
        assert t.dtype == torch.long
    for i, ex in enumerate(examples):
        _check_row(batch, i, ex["prompt"], ex["response"], pad=1)
    assert batch.index.tolist() == [e["index"] for e in examples]
    assert batch.is_harmful.tolist() == [e["is_harmful"] for e in examples]
    assert batch.num_answer_tokens.tolist() == [len(e["response"]) for e in examples]
    tr = max(len(pool[e["index"] % 3]) for e in examples)
    assert batch.refusal_ids.shape == (b, tr)
    for i, ex in enumerate(examples):
        r = pool[ex["index"] % 3]
        assert batch.refusal_ids[i].tolist() == r + [1] * (tr - len(r))
        assert batch.refusal_mask[i].tolist() == [1] * len(r) + [0] * (tr - len(r))
        assert batch.refusal_labels[i].tolist() == r + [-100] * (tr - len(r))
    # the refusal view is the same prompts with the refusal as answer
    view = batch.refusal_view()
    assert view.prompt_len == p and view.input_ids.shape == (b, p + tr)
    for i, ex in enumerate(examples):
        _check_row(view, i, ex["prompt"], pool[ex["index"] % 3], pad=1)
    pos = batch.refusal_positions()
    assert torch.equal(pos, view.position_ids[:, p:])


def test_token_ids_used_exactly_no_eos():
    ex = [
        {"prompt": [5, 6, 7], "response": [8, 9], "index": 0},
        {"prompt": (10,), "response": [11], "index": 1},
    ]
    batch = FinetuneCollator(refusals=[[20, 21], [22]])(ex)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [0, 0, 10, 11, 0]]
    assert batch.refusal_ids.tolist() == [[20, 21], [22, 0]]
    assert batch.is_harmful is None
    # tensors of ids are accepted too
    ex2 = [{"prompt": torch.tensor([5, 6, 7]), "response": torch.tensor([8, 9]), "index": torch.tensor(0)}]
    b2 = FinetuneCollator(refusals=[[20, 21]])(ex2)
    assert b2.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    # and numpy arrays / numpy scalars (e.g. from a datasets table)
    ex3 = [
        {
            "prompt": np.array([5, 6, 7]),
            "response": np.array([8, 9]),
            "index": np.int64(0),
            "is_harmful": np.bool_(True),
        }
    ]
    b3 = FinetuneCollator(refusals=[np.array([20, 21])])(ex3)
    assert b3.input_ids.tolist() == [[5, 6, 7, 8, 9]] and b3.is_harmful.tolist() == [True]
    assert b3.refusal_ids.tolist() == [[20, 21]]


def test_to_and_views_keep_class():
    batch = FinetuneCollator(refusals=make_refusal_pool(4))(make_examples(3))
    moved = batch.to("cpu")
    assert type(moved) is FinetuneBatch and moved.prompt_len == batch.prompt_len
    assert torch.equal(moved.refusal_ids, batch.refusal_ids)
    plain = batch.answer_view()
    assert type(plain) is LMBatch and torch.equal(plain.labels, batch.labels)


def test_align_collator():
    pool = make_refusal_pool(4, seed=1)
    align = make_examples(3, seed=1, harmful_every=None)
    harmful = make_examples(2, seed=2, harmful_every=1, start_index=5)
    ab = AlignCollator(refusals=pool)(align, harmful)
    assert isinstance(ab, AlignBatch)
    for i, ex in enumerate(align):
        _check_row(ab.align, i, ex["prompt"], ex["response"], pad=0)
    for i, ex in enumerate(harmful):
        _check_row(ab.harmful, i, ex["prompt"], ex["response"], pad=0)
        _check_row(ab.refusal, i, ex["prompt"], pool[ex["index"] % 4], pad=0)
    assert ab.align.is_harmful is None and ab.harmful.is_harmful.all()
    assert ab.refusal.index.tolist() == [5, 6]
    assert type(ab.to("cpu")) is AlignBatch
    with pytest.raises(ValueError, match="empty"):
        AlignCollator(refusals=pool)([], harmful)
    with pytest.raises(ValueError, match="empty"):
        AlignCollator(refusals=pool)(align, [])


# ------------------------------------------------------------------------------------------------ truncation


def test_truncation_prompt_left_first_then_answer():
    c = FinetuneCollator(refusals=[[50, 51, 52, 53, 54, 55]], max_length=6, truncation="left")
    b = c([{"prompt": [3, 4, 5, 6], "response": [7, 8, 9], "index": 0}])
    # prompt loses its oldest token first
    assert b.input_ids.tolist() == [[4, 5, 6, 7, 8, 9]]
    # the refusal on the same (truncated) prompt fits in max_length too
    assert b.refusal_ids.tolist() == [[50, 51, 52]]
    # prompt down to one token, then the answer is cut from the right
    b = c([{"prompt": [3, 4, 5, 6], "response": [7, 8, 9, 10, 11, 12, 13], "index": 0}])
    assert b.input_ids.tolist() == [[6, 7, 8, 9, 10, 11]]
    assert b.prompt_lengths.tolist() == [1]
    # no truncation at the limit
    b = c([{"prompt": [3, 4], "response": [7, 8, 9, 10], "index": 0}])
    assert b.input_ids.tolist() == [[3, 4, 7, 8, 9, 10]]


# ------------------------------------------------------------------------------------------------ tokenizer


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in DEFAULT_REFUSALS for w in s.split()} | {"how", "are", "you", "fine", "thanks"})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ), vocab


def test_tokenizer_path_appends_eos_and_uses_defaults():
    tok, vocab = _tiny_tokenizer()
    c = FinetuneCollator(tokenizer=tok)
    # prompt + answer are tokenized as one text: prompts end with a separator (the Alpaca template's "\n")
    b = c([{"prompt": "how are you\n", "response": "fine thanks", "index": 3, "is_harmful": False}])
    prompt = [1, vocab["how"], vocab["are"], vocab["you"]]  # BOS from the tokenizer's defaults
    answer = [vocab["fine"], vocab["thanks"], 2]  # EOS appended
    _check_row(b, 0, prompt, answer, pad=0)
    refusal = [vocab[w] for w in DEFAULT_REFUSALS[3].split()] + [2]
    assert b.refusal_ids[0].tolist() == refusal
    # custom text pool, tokenized with EOS; token-id entries are used as given
    c2 = FinetuneCollator(tokenizer=tok, refusals=["fine thanks", [7, 8]])
    b2 = c2(
        [
            {"prompt": "how\n", "response": [9, 10], "index": 0},
            {"prompt": [1, 4], "response": "you", "index": 1},
        ]
    )
    assert b2.refusal_ids.tolist() == [[vocab["fine"], vocab["thanks"], 2], [7, 8, 0]]
    assert b2.input_ids.tolist() == [[1, vocab["how"], 9, 10], [1, 4, vocab["you"], 2]]
    # the alignment collator: R pairs each harmful prompt with the default pool entry index mod len(pool)
    ab = AlignCollator(tokenizer=tok)(
        [{"prompt": "how are you\n", "response": "fine", "index": 0}],
        [{"prompt": "you\n", "response": "thanks", "index": len(DEFAULT_REFUSALS) + 2}],
    )
    _check_row(ab.align, 0, prompt, [vocab["fine"], 2], pad=0)
    _check_row(ab.harmful, 0, [1, vocab["you"]], [vocab["thanks"], 2], pad=0)
    _check_row(ab.refusal, 0, [1, vocab["you"]], [vocab[w] for w in DEFAULT_REFUSALS[2].split()] + [2], pad=0)
    # ids beyond the tokenizer's vocabulary are rejected
    with pytest.raises(ValueError, match="out of range"):
        c2([{"prompt": [1, 10**6], "response": [5], "index": 0}])


def test_default_pool():
    assert len(DEFAULT_REFUSALS) >= 50
    assert len(set(DEFAULT_REFUSALS)) == len(DEFAULT_REFUSALS)
    assert all(isinstance(s, str) and 5 < len(s) < 120 for s in DEFAULT_REFUSALS)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_errors():
    pool = [[5, 6]]
    c = FinetuneCollator(refusals=pool)
    with pytest.raises(ValueError, match="empty"):
        c([])
    with pytest.raises(ValueError, match=r"index 7 is missing the field 'response'"):
        c([{"prompt": [3], "index": 7}])
    with pytest.raises(ValueError, match=r"missing the field 'prompt'"):
        c([{"response": [3], "index": 2}])
    with pytest.raises(ValueError, match="'index'"):
        c([{"prompt": [3], "response": [4]}])
    with pytest.raises(ValueError, match=r"index 4 has a response with zero tokens"):
        c([{"prompt": [3], "response": [4], "index": 0}, {"prompt": [3], "response": [], "index": 4}])
    with pytest.raises(ValueError, match=r"index 1 has an empty prompt"):
        c([{"prompt": [], "response": [4], "index": 1}])
    with pytest.raises(ValueError, match="no tokenizer"):
        c([{"prompt": "text", "response": [4], "index": 0}])
    with pytest.raises(TypeError, match="ints"):
        c([{"prompt": [3.5], "response": [4], "index": 0}])
    with pytest.raises(ValueError, match="is_harmful"):
        c(
            [
                {"prompt": [3], "response": [4], "index": 0, "is_harmful": True},
                {"prompt": [3], "response": [4], "index": 1},
            ]
        )
    # pools
    with pytest.raises(ValueError, match="default refusal pool holds text"):
        FinetuneCollator()
    with pytest.raises(ValueError, match="refusals= holds text"):
        FinetuneCollator(refusals=["no"])
    with pytest.raises(ValueError, match="pool is empty"):
        FinetuneCollator(refusals=[])
    with pytest.raises(ValueError, match="entry 1 is empty"):
        FinetuneCollator(refusals=[[3], []])
    with pytest.raises(ValueError, match="max_length"):
        FinetuneCollator(refusals=pool, max_length=1)


def test_import_is_lean():
    code = "import sys, antibody_fast.data; assert 'transformers' not in sys.modules and 'datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_prompt_aligned_batch_matches_unpadded_forwards(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    examples = make_examples(4, seed=11, prompt_len=(1, 6), answer_len=(1, 5))
    batch = FinetuneCollator(refusals=make_refusal_pool(3, seed=12))(examples)
    with torch.no_grad():
        lp, n = sequence_logprobs(model, batch)
    expected = torch.stack([unpadded_logprob(model, e["prompt"], e["response"]) for e in examples])
    assert n.tolist() == [len(e["response"]) for e in examples]
    assert_close(lp.double(), expected, dtype_for_tol=torch.float32, name="answer logprob")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_prefix_cache_continuation_matches_full_refusal_forward(arch):
    """docs/design.md §3: crop the training forward's cache to P columns and run the refusal as a continuation."""
    model = tiny_model(arch)
    pool = make_refusal_pool(3, seed=13, length=(1, 5))
    examples = make_examples(4, seed=14, prompt_len=(1, 6), answer_len=(1, 5))
    batch = FinetuneCollator(refusals=pool)(examples)
    trunk, head, softcap = get_trunk_and_head(model)
    p, width = batch.prompt_len, batch.input_ids.shape[1]
    with torch.no_grad():
        out = trunk(**batch.model_inputs(), use_cache=True)
        cache = out.past_key_values
        cache.crop(-(width - p))
        assert cache.get_seq_length() == p
        h_r = trunk(
            input_ids=batch.refusal_ids,
            attention_mask=torch.cat([batch.attention_mask[:, :p], batch.refusal_mask], dim=1),
            position_ids=batch.refusal_positions(),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        rows = torch.cat([out.last_hidden_state[:, p - 1 : p], h_r[:, :-1]], dim=1)
        logits = head(rows).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp = torch.log_softmax(logits, dim=-1)
        mask = batch.refusal_labels != -100
        tok = logp.gather(-1, batch.refusal_labels.clamp_min(0)[..., None])[..., 0]
        cached = (tok * mask).sum(1)
        full, n_full = sequence_logprobs(model, batch.refusal_view())
    assert torch.equal(n_full, mask.sum(1))
    expected = torch.stack([unpadded_logprob(model, e["prompt"], pool[e["index"] % 3]) for e in examples])
    assert_close(full.double(), expected, dtype_for_tol=torch.float32, name="full refusal logprob")
    assert_close(cached.double(), expected, dtype_for_tol=torch.float32, name="cached refusal logprob")


def test_get_trunk_and_head():
    from antibody_fast.models import add_lora, tiny_gemma2, tiny_llama

    base = tiny_llama(vocab_size=VOCAB)
    trunk, head, softcap = get_trunk_and_head(base)
    assert trunk is base.model and head is base.lm_head and softcap is None
    peft = add_lora(tiny_llama(vocab_size=VOCAB))
    trunk, head, softcap = get_trunk_and_head(peft)
    assert trunk is peft.get_base_model().model
    assert not head.weight.requires_grad
    assert sum(p.numel() for p in peft.parameters() if p.requires_grad) > 0
    _, _, softcap = get_trunk_and_head(tiny_gemma2(vocab_size=VOCAB))
    assert softcap == 30.0
    with pytest.raises(TypeError, match="causal LM"):
        get_trunk_and_head(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError):
        get_trunk_and_head("model")
    lora_head = add_lora(tiny_llama(vocab_size=VOCAB), targets=("q_proj", "lm_head"))
    with pytest.raises(TypeError, match="lm_head"):
        get_trunk_and_head(lora_head)


def test_tiny_factories_seeded():
    from antibody_fast.models import tiny_qwen2

    state = torch.random.get_rng_state()
    a = tiny_qwen2(seed=3)
    b = tiny_qwen2(seed=3)
    c = tiny_qwen2(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
