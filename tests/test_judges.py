"""HS judges: a causal LM or a checkpoint without a trained head is refused as a classifier judge
(it would report a bogus HS); the Llama-Guard-style causal-LM judge decides safe/unsafe (docs/reliability.md)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizer_helpers import VOCAB_SIZE, tiny_tokenizer

from antibody_fast.evaluate import CausalLMJudge, ClassifierJudge, make_judge


def _llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("causal")
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config()).save_pretrained(str(d))
    tiny_tokenizer().save_pretrained(str(d))
    return str(d)


def test_causal_lm_refused_as_classifier(causal_dir):
    with pytest.raises(ValueError, match="not a sequence classifier"):
        ClassifierJudge(causal_dir)


def test_newly_initialised_head_refused(tmp_path):
    """A checkpoint whose config says sequence classifier but that holds no head weights."""
    from transformers import LlamaForCausalLM

    d = tmp_path / "headless"
    cfg = _llama_config(num_labels=2, id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(d))  # weights without a "score" head
    conf = json.loads((d / "config.json").read_text())
    conf["architectures"] = ["LlamaForSequenceClassification"]  # a config that claims a classifier
    (d / "config.json").write_text(json.dumps(conf))
    tiny_tokenizer().save_pretrained(str(d))
    with pytest.raises(ValueError, match="no trained classification head"):
        ClassifierJudge(str(d))


def _bias_towards(judge, token_id):
    def hook(_m, _i, out):
        out = out.clone()
        out[..., token_id] += 100.0
        return out

    return judge.model.get_output_embeddings().register_forward_hook(hook)


def test_causal_lm_judge_decides_safe_unsafe(causal_dir):
    judge = make_judge(causal_dir, "causal-lm", batch_size=2)
    assert isinstance(judge, CausalLMJudge) and not judge.is_proxy and judge.name.startswith("causal-lm:")
    prompts = ["How do I make a bomb?", "Bake bread?", "Hi"]
    answers = ["Step 1: ...", "Flour, water.", "Hello!"]
    scores = judge.scores(prompts, answers)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    # the judge says "unsafe" -> flagged; "safe" -> not flagged
    h = _bias_towards(judge, judge.unsafe_id)
    assert judge(prompts, answers) == [True, True, True]
    h.remove()
    h = _bias_towards(judge, judge.safe_id)
    assert judge(prompts, answers) == [False, False, False]
    h.remove()
    # batching does not change the verdicts (left padding + position ids)
    one = [judge.scores([p], [a])[0] for p, a in zip(prompts, answers)]
    assert one == pytest.approx(scores, abs=1e-5)


def test_causal_lm_judge_verdict_is_greedy_generation(causal_dir):
    """The flag equals what greedy generation picks when the judge's reply is one of the two verdicts."""
    judge = CausalLMJudge(causal_dir)
    allowed = {judge.safe_id, judge.unsafe_id}

    def restrict(_m, _i, out):  # only the two verdict tokens can be generated
        mask = torch.full_like(out, float("-inf"))
        mask[..., list(allowed)] = 0.0
        return out + mask

    h = judge.model.get_output_embeddings().register_forward_hook(restrict)
    try:
        for p, a in (("q", "answer one"), ("another q", "b")):
            ids = torch.tensor([judge.judge_prompt(p, a)])
            nxt = int(judge.model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1])
            assert judge([p], [a]) == [nxt == judge.unsafe_id]
    finally:
        h.remove()


def test_classifier_refused_as_causal_judge(tmp_path):
    from transformers import LlamaForSequenceClassification

    d = tmp_path / "cls"
    LlamaForSequenceClassification(_llama_config(num_labels=2)).save_pretrained(str(d))
    tiny_tokenizer().save_pretrained(str(d))
    with pytest.raises(ValueError, match="not a causal LM"):
        CausalLMJudge(str(d))
    with pytest.raises(ValueError, match="judge kind"):
        make_judge(str(d), "llama-guard")
