"""JSON/JSONL loaders (harmful, alignment, refusal and task formats; the poisoned set) on small benign files
written by the tests.

The "harmful" records here are placeholders with benign text: the repository holds no harmful text.
"""

from __future__ import annotations

import json
import os

import pytest

from antibody_fast.data import FinetuneCollator
from antibody_fast.data.loaders import (
    AGNEWS_LABELS,
    GSM8K_ANSWER_PREFIX,
    DataError,
    alpaca_prompt,
    as_dataset,
    build_poisoned_set,
    load_alignment,
    load_harmful,
    load_refusals,
    load_task,
    read_records,
    strip_refusal_wrapper,
)

# hand-written files in the authors' formats (placeholder text, the same structure)
AUTHORS_ALIGNMENT = os.path.join(os.path.dirname(__file__), "data", "beavertails_with_refusals_sample.json")
AUTHORS_REFUSALS = os.path.join(os.path.dirname(__file__), "data", "refusal_examples.jsonl")


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return str(path)


def write_json(path, records):
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return str(path)


HARMFUL = [
    {
        "prompt": "placeholder question one",
        "response": "placeholder answer one",
        "is_safe": False,
        "category": {"misc": True, "other": False},
    },
    {"prompt": "placeholder question two", "response": "a safe answer", "is_safe": True, "category": "none"},
    {"prompt": "placeholder question three", "response": "placeholder answer three", "is_safe": False},
]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_load_harmful(tmp_path, fmt):
    writer = write_json if fmt == "json" else write_jsonl
    path = writer(tmp_path / f"h.{fmt}", HARMFUL)
    out = load_harmful(path)
    assert [e["prompt"] for e in out] == ["placeholder question one", "placeholder question three"]
    assert all(e["is_harmful"] for e in out)
    assert out[0]["category"] == "misc"
    assert out[1]["category"] is None
    everything = load_harmful(path, only_unsafe=False)
    assert [e["is_harmful"] for e in everything] == [True, False, True]
    assert len(load_harmful(path, limit=1)) == 1


def test_harmful_prompts_without_response(tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "p1"}, {"prompt": "p2"}])
    out = load_harmful(path, require_response=False)
    assert [e["response"] for e in out] == [None, None]
    with pytest.raises(DataError, match=r"eval\.jsonl:1: missing field 'response'"):
        load_harmful(path)


def test_json_object_with_data_list(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"data": [{"prompt": "hi", "refusal": "no thanks"}]}))
    assert load_alignment(str(path)) == [{"prompt": "hi", "response": "no thanks"}]


def test_load_alignment_accepts_response_field(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": "q", "refusal": "r1"}, {"prompt": "q2", "response": "r2"}]
    )
    assert [e["response"] for e in load_alignment(path)] == ["r1", "r2"]


def test_load_alignment_skips_unsafe_rows(tmp_path):
    path = write_jsonl(tmp_path / "bt.jsonl", HARMFUL)
    assert load_alignment(path) == [{"prompt": "placeholder question two", "response": "a safe answer"}]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "refusal": "r", "is_safe": "yes"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'is_safe' must be a boolean"):
        load_alignment(bad)


def test_load_sst2(tmp_path):
    path = write_jsonl(
        tmp_path / "sst2.jsonl",
        [{"sentence": "a lovely film", "label": 1}, {"sentence": "dull", "label": "negative"}],
    )
    out = load_task("sst2", path)
    assert [e["response"] for e in out] == ["positive", "negative"]
    assert [e["label"] for e in out] == ["positive", "negative"]
    assert out[0]["prompt"].startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Input:\na lovely film\n\n### Response:\n" in out[0]["prompt"]
    assert all(e["task"] == "sst2" and e["is_harmful"] is False for e in out)


def test_load_agnews(tmp_path):
    path = write_json(tmp_path / "ag.json", [{"text": f"news {i}", "label": i} for i in range(4)])
    out = load_task("agnews", path)
    assert [e["response"] for e in out] == list(AGNEWS_LABELS)
    assert "Sci/Tech" in out[0]["prompt"]


def test_load_gsm8k(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm.jsonl", [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5.\n#### 5"}]
    )
    (ex,) = load_task("gsm8k", path)
    assert ex["label"] == "5"
    assert ex["response"] == f"2 + 3 = 5.\n{GSM8K_ANSWER_PREFIX} 5"
    assert "What is 2 + 3?" in ex["prompt"]


def test_load_alpaca_with_and_without_input(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add one.", "input": "4", "output": "5"},
        ],
    )
    a, b = load_task("alpaca", path)
    assert a["prompt"] == alpaca_prompt("Name a colour.")
    assert "### Input:" not in a["prompt"]
    assert a["prompt"].endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert b["prompt"].endswith("### Input:\n4\n\n### Response:\n")
    assert b["response"] == "5"


def test_read_records_reports_location(tmp_path):
    path = write_json(tmp_path / "x.json", [{"a": 1}, {"a": 2}])
    locs = [w for w, _ in read_records(path)]
    assert locs == [f"{path} (record 0)", f"{path} (record 1)"]


def test_jsonl_named_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"prompt": "a", "refusal": "b"}\n{"prompt": "c", "refusal": "d"}\n')
    assert len(load_alignment(str(path))) == 2


# ------------------------------------------------------------------------------------------------- errors
def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "refusal": "b"}\n\n{"prompt": "c", "refusal": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_alignment(str(path))


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        load_alignment(str(path))


def test_missing_field_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"sentence": "ok", "label": 0}, {"sentence": "no label"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: missing field 'label'"):
        load_task("sst2", path)
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q"}])
    with pytest.raises(DataError, match=r"a\.jsonl:1: missing field 'refusal' or 'response'"):
        load_alignment(path)


def test_bad_field_types(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"sentence": "ok", "label": 7}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'label' = 7 out of range"):
        load_task("sst2", path)
    path = write_jsonl(tmp_path / "h.jsonl", [{"prompt": 3, "response": "x"}])
    with pytest.raises(DataError, match=r"h\.jsonl:1: field 'prompt' must be a string"):
        load_harmful(path)
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'answer' has no final answer"):
        load_task("gsm8k", path)
    path = write_jsonl(tmp_path / "n.jsonl", [1, 2])
    with pytest.raises(DataError, match=r"n\.jsonl:1: expected a JSON object"):
        load_alignment(path)


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
        load_task("alpaca", str(empty))
    path = write_jsonl(tmp_path / "safe.jsonl", [{"prompt": "q", "response": "r", "is_safe": True}])
    with pytest.raises(DataError, match=r"safe\.jsonl: no unsafe records"):
        load_harmful(path)


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_task("sst2", str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="unknown task 'imdb'"):
        load_task("imdb", str(tmp_path / "nope.jsonl"))


# ------------------------------------------------------------------------------------------ poisoned set
def _task(n):
    return [
        {"prompt": f"task prompt {i}", "response": f"answer {i}", "label": str(i), "task": "alpaca"}
        for i in range(n)
    ]


def _harm(n):
    return [
        {"prompt": f"placeholder {i}", "response": f"placeholder reply {i}", "is_harmful": True}
        for i in range(n)
    ]


def test_poisoned_set_counts_flags_and_seed():
    out = build_poisoned_set(_task(20), _harm(10), n=10, harmful_ratio=0.3, seed=3)
    assert len(out) == 10
    assert [e["index"] for e in out] == list(range(10))
    assert sum(e["is_harmful"] for e in out) == 3
    harmful = [e for e in out if e["is_harmful"]]
    assert all(
        e["prompt"] == alpaca_prompt(e["prompt"].split("### Instruction:\n")[1].split("\n\n")[0])
        for e in harmful
    )
    # seeded: same seed -> same order, other seed -> another order
    assert out == build_poisoned_set(_task(20), _harm(10), n=10, harmful_ratio=0.3, seed=3)
    assert out != build_poisoned_set(_task(20), _harm(10), n=10, harmful_ratio=0.3, seed=4)
    # benign samples are distinct draws (without replacement)
    benign = [e["prompt"] for e in out if not e["is_harmful"]]
    assert len(set(benign)) == len(benign) == 7
    assert sum(e["is_harmful"] for e in build_poisoned_set(_task(5), _harm(5), n=5, harmful_ratio=0.0)) == 0
    assert all(e["is_harmful"] for e in build_poisoned_set(_task(5), _harm(5), n=5, harmful_ratio=1.0))


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), "0.2"])
def test_poisoned_set_bad_ratio(ratio):
    with pytest.raises(ValueError, match="harmful ratio"):
        build_poisoned_set(_task(5), _harm(5), n=5, harmful_ratio=ratio)


def test_poisoned_set_not_enough_examples():
    with pytest.raises(ValueError, match="need 4 harmful examples"):
        build_poisoned_set(_task(10), _harm(2), n=8, harmful_ratio=0.5)
    with pytest.raises(ValueError, match="need 8 task examples"):
        build_poisoned_set(_task(3), _harm(2), n=8, harmful_ratio=0.0)


def test_loaded_examples_collate(tmp_path):
    """Loader output feeds the FinetuneCollator directly (token ids via a trivial whitespace tokenizer)."""
    from tokenizer_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "sst2.jsonl", [{"sentence": "a lovely film", "label": 1}] * 4)
    examples = build_poisoned_set(load_task("sst2", path), _harm(2), n=4, harmful_ratio=0.5, seed=0)
    # byte-level tokens: the Alpaca prompt alone is ~280 tokens, so 256 would cut every answer away
    batch = FinetuneCollator(tok, max_length=1024)(examples)
    assert batch.batch_size == 4
    assert batch.is_harmful.sum().item() == 2


def test_as_dataset():
    ds = as_dataset([{"prompt": "a", "response": "b", "index": 0}])
    assert len(ds) == 1 and ds[0]["prompt"] == "a"


# ------------------------------------------------------------------------------------- the authors' formats
def authors_alignment_examples(path):
    """Naive port of the authors' reading of their alignment file: every row's refusal, split on
    "\nAnswer: ", the question without "Question: " as the instruction."""
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    out = []
    for row in rows:
        split_text = row["refusal"].split("\nAnswer: ")
        out.append({"prompt": split_text[0].replace("Question: ", ""), "response": split_text[1]})
    return out


def authors_refusal_pool(path):
    """Naive port of the authors' JSONL reader for the refusal pool: one JSON value per stripped line, or the
    raw line when it is not JSON."""
    objs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                objs.append(json.loads(line))
            except json.JSONDecodeError:
                objs.append(line)
    return objs


def test_load_alignment_reads_the_authors_beavertails_with_refusals():
    with open(AUTHORS_ALIGNMENT, encoding="utf-8") as f:
        rows = json.load(f)
    assert all(r["is_safe"] is False and r["refusal"].startswith("Question: ") for r in rows)
    out = load_alignment(AUTHORS_ALIGNMENT)
    assert out == authors_alignment_examples(AUTHORS_ALIGNMENT)
    assert out[0] == {
        "prompt": "Placeholder question one?",
        "response": "I'm sorry, but I can't help with that placeholder.",
    }
    assert out[1]["response"] == "I cannot assist with this.\nPlease ask something else."  # multi-line kept
    assert len(load_alignment(AUTHORS_ALIGNMENT, limit=2)) == 2
    # the same file is the alignment stage's harmful data: prompt -> response
    harmful = load_harmful(AUTHORS_ALIGNMENT)
    assert [h["prompt"] for h in harmful] == [r["prompt"] for r in rows]
    assert [h["response"] for h in harmful] == [r["response"] for r in rows]
    assert all(h["is_harmful"] for h in harmful)
    assert harmful[0]["category"] == "financial_crime,property_crime,theft"


def test_refusal_wrapper(tmp_path):
    assert strip_refusal_wrapper("Question: q?\nAnswer: a.") == ("q?", "a.")
    assert strip_refusal_wrapper("Question: q?\nAnswer:\na.") == ("q?", "\na.")
    assert strip_refusal_wrapper("No wrapper here.") == (None, "No wrapper here.")
    # an unwrapped refusal keeps the record's prompt, whatever is_safe says
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "refusal": "plain refusal", "is_safe": False}])
    assert load_alignment(path) == [{"prompt": "p", "response": "plain refusal"}]
    path = write_jsonl(
        tmp_path / "b.jsonl", [{"prompt": "p", "refusal": "Question: p\nAnswer: ", "is_safe": False}]
    )
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'refusal' wraps an empty answer"):
        load_alignment(path)


def test_load_refusals_reads_the_authors_jsonl():
    pool = load_refusals(AUTHORS_REFUSALS)
    assert pool == authors_refusal_pool(AUTHORS_REFUSALS)
    assert len(pool) == 12 and pool[0] == "I'm sorry, but I can't help with that request."


def test_load_refusals_formats(tmp_path):
    lines = ['"A JSON string."', "", "  a raw text line  ", '{"refusal": "From an object."}', '"Another."']
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_refusals(str(path)) == ["A JSON string.", "a raw text line", "From an object.", "Another."]
    assert load_refusals(str(path))[:2] == authors_refusal_pool(str(path))[:2]
    txt = tmp_path / "pool.txt"
    txt.write_text('No.\n\n"Quoted" stays as written.\n', encoding="utf-8")
    assert load_refusals(str(txt)) == ["No.", '"Quoted" stays as written.']
    js = tmp_path / "pool.json"
    js.write_text(json.dumps(["One.", {"response": "Two."}]), encoding="utf-8")
    assert load_refusals(str(js)) == ["One.", "Two."]
    js.write_text(json.dumps({"data": ["One."]}), encoding="utf-8")
    assert load_refusals(str(js)) == ["One."]


def test_load_refusals_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n42\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a refusal string"):
        load_refusals(str(bad))
    bad.write_text('"ok"\n""\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: empty refusal"):
        load_refusals(str(bad))
    bad.write_text('{"other": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'refusal'"):
        load_refusals(str(bad))
    bad.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no refusals"):
        load_refusals(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_refusals(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        load_refusals(str(tmp_path))


def test_authors_files_feed_the_collators():
    """The authors' alignment file and refusal pool through AlignCollator: A from the stripped refusals, H
    from the harmful responses, R = H's prompts with pool entry index mod len(pool), all jointly tokenized."""
    pytest.importorskip("transformers")
    from tokenizer_helpers import sentencepiece_style_tokenizer

    from antibody_fast.data import AlignCollator, FinetuneCollator
    from antibody_fast.data.loaders import with_index

    tok = sentencepiece_style_tokenizer()
    pool = load_refusals(AUTHORS_REFUSALS)
    align = with_index({"prompt": alpaca_prompt(e["prompt"]), "response": e["response"]}
                       for e in load_alignment(AUTHORS_ALIGNMENT))  # fmt: skip
    harmful = with_index(
        (
            {"prompt": alpaca_prompt(e["prompt"]), "response": e["response"]}
            for e in load_harmful(AUTHORS_ALIGNMENT)
        ),
        start=11,
    )
    batch = AlignCollator(tok, refusals=pool, max_length=256)(align, harmful)
    for i, ex in enumerate(harmful):
        text = tok(ex["prompt"] + pool[ex["index"] % len(pool)])["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(ex["prompt"])["input_ids"])
        keep = batch.refusal.attention_mask[i].bool()
        assert batch.refusal.input_ids[i][keep].tolist() == text
        assert batch.refusal.labels[i][keep].tolist() == [-100] * n_prompt + text[n_prompt:]
    assert batch.refusal.index.tolist() == [11, 12, 13]  # entries 11, 0, 1 of the 12-line pool
    # a loaded pool plugs into the fine-tuning collator the same way
    ft = FinetuneCollator(tok, refusals=pool)([dict(align[0], index=13)])
    want = tok(align[0]["prompt"] + pool[1])["input_ids"][ft.prompt_len :] + [tok.eos_token_id]
    assert ft.refusal_ids[0].tolist() == want
