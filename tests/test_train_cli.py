"""``antibody-fast align / finetune / evaluate`` end to end on a tiny random model saved locally, resume from a
checkpoint, bad input, and the evaluation metrics (FA per task format, HS with each judge, AUROC).

Every data file is written by the tests with benign placeholder text (the repository holds no harmful text).
"""

from __future__ import annotations

import csv
import json
import os
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from antibody_fast.cli import commands  # noqa: E402
from antibody_fast.evaluate import (  # noqa: E402
    RefusalPatternJudge,
    extract_final_answer,
    fine_tune_accuracy,
    greedy_generate,
    harmful_score,
    is_correct,
)

COMMON = ["--max-length", "320", "--lora-r", "2", "--no-progress"]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_cli_env(tmp_path_factory.mktemp("cli"))


def make_cli_env(root):
    """A tiny model + tokenizer saved under ``root`` and placeholder data files; returns their paths."""
    from tokenizer_helpers import VOCAB_SIZE, tiny_tokenizer

    from antibody_fast.models import tiny_llama

    model_dir = root / "model"
    tiny_llama(vocab_size=VOCAB_SIZE, seed=0).save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    files = {
        "model": str(model_dir),
        "align": _jsonl(
            root / "align.jsonl",
            [
                {"prompt": f"placeholder request {i}", "refusal": "Sorry, I cannot help with that."}
                for i in range(6)
            ],
        ),
        "harmful": _jsonl(
            root / "harmful.jsonl",
            [
                {
                    "prompt": f"placeholder request {i}",
                    "response": f"placeholder reply {i}",
                    "is_safe": False,
                    "category": {"misc": True},
                }
                for i in range(6)
            ],
        ),
        "sst2": _jsonl(
            root / "sst2.jsonl",
            [{"sentence": f"film {i} was {'good' if i % 2 else 'dull'}", "label": i % 2} for i in range(12)],
        ),
    }
    files["root"] = root
    return files


def _finetune_args(env, out, *extra):
    return [
        "--model", env["model"], "--task", "sst2", "--task-data", env["sst2"], "--harmful-data", env["harmful"],
        "--harmful-ratio", "0.25", "--num-samples", "8", "--batch-size", "4", "--steps", "4", "--output", str(out),
        *COMMON, *extra,
    ]  # fmt: skip


def _adapter_state(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------- end to end
def test_align_finetune_evaluate(env, tmp_path, capsys):
    align_out = tmp_path / "align"
    rc = commands.main(
        "align",
        ["--model", env["model"], "--align-data", env["align"], "--harmful-data", env["harmful"], "--steps", "2",
         "--batch-size", "2", "--output", str(align_out), *COMMON],
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (align_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["lambda_t"] >= 0 and r["tokens_per_s"] > 0 and r["step_time_s"] > 0
        assert all(k in r for k in ("loss_align", "loss_harmful", "loss_perturbed", "loss_refusal", "cos"))
    assert (align_out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((align_out / "run_config.json").read_text())["rule"] == "cosine"

    ft_out = tmp_path / "ft"
    rc = commands.main("finetune", _finetune_args(env, ft_out, "--adapter", str(align_out / "adapter")))
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (ft_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert abs(r["weight_mean"] - 0.25) < 1e-6  # softmax over a batch of 4
        assert 0 < r["harmful_weight"] < 1 and 0 < r["benign_weight"] < 1
    with open(ft_out / "suppression_report.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [int(r["index"]) for r in report] == list(range(8))
    assert sum(int(r["is_harmful"]) for r in report) == 2
    assert sum(int(r["times_seen"]) for r in report) == 4 * 4
    assert all(float(r["mean_weight"]) > 0 for r in report if int(r["times_seen"]) > 0)
    for r in report:
        assert float(r["relative_weight"]) == pytest.approx(4 * float(r["mean_weight"]), rel=1e-5)
    summary = json.loads((ft_out / "suppression_summary.json").read_text())
    assert 0.0 <= summary["auroc_benign_vs_harmful"] <= 1.0
    assert summary["num_harmful_seen"] == 2
    pytest.importorskip("matplotlib")
    assert (ft_out / "suppression_hist.png").stat().st_size > 0

    ev_out = tmp_path / "eval"
    rc = commands.main(
        "evaluate",
        ["--model", env["model"], "--adapter", str(align_out / "adapter"), "--adapter", str(ft_out / "adapter"),
         "--task", "sst2", "--task-data", env["sst2"], "--harmful-prompts", env["harmful"], "--num-eval", "3",
         "--max-new-tokens", "3", "--batch-size", "2", "--output", str(ev_out), "--no-progress"],
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    result = json.loads((ev_out / "eval.json").read_text())
    assert result["judge"] == "refusal-pattern (proxy)" and result["judge_is_proxy"] is True
    assert 0.0 <= result["fa"] <= 100.0 and 0.0 <= result["hs"] <= 100.0
    assert result["num_task"] == 3 and result["num_harmful"] == 3
    samples = [json.loads(x) for x in (ev_out / "samples.jsonl").read_text().splitlines()]
    assert [s["kind"] for s in samples] == ["task"] * 3 + ["harmful"] * 3
    err = capsys.readouterr().err
    assert "HS = " in err and "proxy" in err


def test_finetune_resume_equals_uninterrupted(env, tmp_path, capsys):
    full = tmp_path / "full"
    assert (
        commands.main("finetune", _finetune_args(env, full, "--lr", "1e-2", "--lr-scheduler", "linear")) == 0
    )
    part = tmp_path / "part"
    args = _finetune_args(env, part, "--lr", "1e-2", "--lr-scheduler", "linear", "--save-every", "1")
    assert commands.main("finetune", [*args, "--stop-after", "2"]) == 0
    assert not (part / "adapter").exists() and (part / "checkpoint.pt").is_file()
    assert "resume with --resume" in capsys.readouterr().err
    # the same output without --resume is refused (it would clobber the run)
    assert commands.main("finetune", args) == 2
    assert "--resume" in capsys.readouterr().err
    assert commands.main("finetune", [*args, "--resume"]) == 0
    a, b = _adapter_state(full), _adapter_state(part)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (full / "suppression_report.csv").read_text() == (part / "suppression_report.csv").read_text()
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_align_resume_equals_uninterrupted(env, tmp_path):
    def args(out):
        return ["--model", env["model"], "--align-data", env["align"], "--harmful-data", env["harmful"],
                "--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--momentum", "0.5", "--output", str(out),
                *COMMON]  # fmt: skip

    assert commands.main("align", args(tmp_path / "full")) == 0
    assert commands.main("align", [*args(tmp_path / "part"), "--stop-after", "1"]) == 0
    assert commands.main("align", [*args(tmp_path / "part"), "--resume"]) == 0
    a, b = _adapter_state(tmp_path / "full"), _adapter_state(tmp_path / "part")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lam = [json.loads(x)["lambda_t"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lam2 = [json.loads(x)["lambda_t"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert lam == lam2


def test_finetune_sft_baseline(env, tmp_path, capsys):
    out = tmp_path / "sft"
    assert commands.main("finetune", _finetune_args(env, out, "--method", "sft", "--steps", "2")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("weight_mean" not in r for r in rows)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "suppression_report.csv").exists()


def test_config_file_and_flags(env, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {env['model']}\ntask: sst2\ntask-data: {env['sst2']}\nharmful_data: {env['harmful']}\n"
        "harmful_ratio: 0.5\nnum_samples: 6\nsteps: 3\nlora_targets: q_proj,v_proj\n"
    )
    opts = commands.parse_options("finetune", ["--config", str(cfg), "--output", "x", "--steps", "7"])
    assert opts["steps"] == 7 and opts["harmful_ratio"] == 0.5 and opts["num_samples"] == 6
    assert opts["lora_targets"] == ["q_proj", "v_proj"]
    jcfg = tmp_path / "cfg.json"
    jcfg.write_text(json.dumps({"model": env["model"], "output": "o", "harmful_prompts": env["harmful"]}))
    assert commands.parse_options("evaluate", ["--config", str(jcfg)])["output"] == "o"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"modle": "x"}))
    with pytest.raises(commands.CLIError, match="unknown option 'modle'"):
        commands.parse_options("evaluate", ["--config", str(bad)])
    bad.write_text('{"model": "x",\n "steps": }')
    with pytest.raises(commands.CLIError, match=r"bad\.json:2: malformed JSON"):
        commands.parse_options("align", ["--config", str(bad)])
    bad.write_text(json.dumps({"steps": "many"}))
    with pytest.raises(commands.CLIError, match="option 'steps' must be int"):
        commands.parse_options("align", ["--config", str(bad)])


def test_help_and_unknown_command(capsys):
    assert commands.main("finetune", ["--help"]) == 0
    assert "--harmful-ratio" in capsys.readouterr().out
    assert commands.main("train", []) == 2


# ---------------------------------------------------------------------------------------------- bad input
def _bad_finetune(env, tmp_path, capsys, *, task_data=None, extra=(), model=None):
    out = tmp_path / "out"
    args = _finetune_args(env, out, *extra)
    if task_data is not None:
        args[args.index("--task-data") + 1] = task_data
    if model is not None:
        args[args.index("--model") + 1] = model
    rc = commands.main("finetune", args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err
    assert not out.exists(), "nothing may be written on bad input"
    return err


def test_bad_input_malformed_json(env, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence": "ok", "label": 1}\n{"sentence": "broken", "label": \n')
    err = _bad_finetune(env, tmp_path, capsys, task_data=str(path))
    assert f"{path}:2: malformed JSON" in err


def test_bad_input_missing_field(env, tmp_path, capsys):
    path = _jsonl(tmp_path / "nolabel.jsonl", [{"sentence": "ok", "label": 1}, {"sentence": "no label"}])
    err = _bad_finetune(env, tmp_path, capsys, task_data=path)
    assert f"{path}:2: missing field 'label'" in err


def test_bad_input_empty_dataset(env, tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    err = _bad_finetune(env, tmp_path, capsys, task_data=str(path))
    assert "empty.jsonl: the dataset is empty" in err


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "nan"])
def test_bad_input_ratio(env, tmp_path, capsys, ratio):
    err = _bad_finetune(env, tmp_path, capsys, extra=("--harmful-ratio", ratio))
    assert "--harmful-ratio must be in [0, 1]" in err


def test_bad_input_unknown_model(env, tmp_path, capsys, monkeypatch):
    err = _bad_finetune(env, tmp_path, capsys, model=str(tmp_path / "no_such_model"))
    assert "no such model directory" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _bad_finetune(env, tmp_path, capsys, model="no-such-org/no-such-model-xyz")
    assert "HF_HUB_OFFLINE" in err


def test_bad_input_too_few_samples_and_missing_option(env, tmp_path, capsys):
    err = _bad_finetune(env, tmp_path, capsys, extra=("--num-samples", "20"))
    assert "need 15 task examples but only 12 given" in err
    rc = commands.main("align", ["--model", env["model"], "--output", str(tmp_path / "o")])
    assert rc == 2 and "--align-data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- metrics
def test_is_correct_per_task():
    assert is_correct("sst2", " Positive.\nmore text", "positive")
    assert not is_correct("sst2", "positive and negative", "positive")
    assert is_correct("agnews", "Sci/Tech", "Sci/Tech")
    assert not is_correct("agnews", "Sports", "World")
    assert is_correct("gsm8k", "2 + 3 = 5\nThe final answer is: 5", "5")
    assert is_correct("gsm8k", "The final answer is: 1,200.0 dollars", "1200")
    assert not is_correct("gsm8k", "The answer is 5", "5")
    assert is_correct("alpaca", "anything", "x") is None
    assert extract_final_answer("The final answer is: 3. Then The final answer is: -7") == "-7"
    assert fine_tune_accuracy(
        "sst2", ["positive", "negative", "positive"], ["positive", "positive", "positive"]
    ) == (pytest.approx(200 / 3))
    assert fine_tune_accuracy("alpaca", ["a"], ["b"]) is None
    with pytest.raises(ValueError):
        is_correct("imdb", "a", "b")


def test_refusal_pattern_judge():
    judge = RefusalPatternJudge()
    assert judge.is_proxy and "proxy" in judge.name
    flags = judge(
        ["p"] * 4, ["I'm sorry, I can\u2019t do that.", "Sure, here it is.", "  ", "I cannot assist."]
    )
    assert flags == [False, True, False, False]
    hs, f = harmful_score(judge, ["a", "b"], ["Sure.", "I will not."])
    assert hs == 50.0 and f == [True, False]


def test_auroc_matches_pairwise_definition():
    rng = random.Random(0)
    pos = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(9)]
    neg = [rng.choice([0.1, 0.2, 0.3]) for _ in range(7)]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert commands.auroc(pos, neg) == pytest.approx(brute)
    assert commands.auroc([1.0], [0.0]) == 1.0
    assert commands.auroc([], [0.0]) != commands.auroc([], [0.0])  # NaN


def test_greedy_generate_batched_equals_single(env):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(env["model"])
    tok = AutoTokenizer.from_pretrained(env["model"])
    prompts = ["a short one", "a somewhat longer prompt here", "mid length"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=5, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single
    # manual greedy loop on the first prompt
    ids = torch.tensor([tok(prompts[0])["input_ids"]])
    with torch.no_grad():
        for _ in range(5):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == tok.eos_token_id:
                break
    new = ids[0, len(tok(prompts[0])["input_ids"]) :]
    assert batched[0] == tok.decode(new, skip_special_tokens=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tok, prompts, max_new_tokens=0)


def test_classifier_judge(tmp_path):
    from tokenizer_helpers import VOCAB_SIZE, tiny_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from antibody_fast.evaluate import ClassifierJudge

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=2, pad_token_id=0, id2label={0: "safe", 1: "unsafe"},
        label2id={"safe": 0, "unsafe": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(tmp_path / "judge"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "judge"))
    judge = ClassifierJudge(str(tmp_path / "judge"), batch_size=2)
    assert judge.harmful_ids == [1] and not judge.is_proxy
    prompts, answers = ["q1", "q2", "q3"], ["answer one", "a", "another answer"]
    scores = judge.scores(prompts, answers)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert judge(prompts, answers) == [s >= 0.5 for s in scores]
    assert ClassifierJudge(str(tmp_path / "judge"), harmful_labels=["safe"]).harmful_ids == [0]
    with pytest.raises(ValueError, match="unknown label"):
        ClassifierJudge(str(tmp_path / "judge"), harmful_labels=["toxic"])


# ------------------------------------------------------------------------------------ torchrun (2 x gloo)
# A native abort in one torchrun child, "terminate called without an active exception" (SIGABRT from a thread with
# no Python frame, right after the model loads), was seen in about 1 of 10 runs on the 2-core machine on
# 2026-12-07; its cause is not found yet (the stop note lists it). That one signature is retried once, on a fresh
# output folder; any other failure, or the same abort twice, fails the test.
def _torchrun(command, args, nproc=2):
    """``python -m torch.distributed.run --standalone -m antibody_fast <command> <args>`` (gloo on CPU). The
    workers leave through ``antibody_fast.cli.exit_process``, which skips the interpreter teardown that aborted
    about one worker exit in ten here; a native abort is a failure, never retried."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "antibody_fast", command, *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _csv_weights(path):
    with open(path) as f:
        return {int(r["index"]): (int(r["times_seen"]), r["mean_weight"]) for r in csv.DictReader(f)}


def test_torchrun_two_processes_equal_one_process_with_the_global_batch(env, tmp_path, capsys):
    """``torchrun --nproc-per-node 2`` with --batch-size 2 = one process with --batch-size 4: same adapter, same
    per-sample weights; only rank 0 writes. A 2-process checkpoint resumes in one process (the data order is
    defined over the global batch)."""
    from antibody_fast.testing import assert_close

    def args(out, bs, *extra):
        a = _finetune_args(env, out, "--lr", "1e-2", *extra)
        a[a.index("--batch-size") + 1] = str(bs)
        return a

    single = tmp_path / "single"
    assert commands.main("finetune", args(single, 4)) == 0
    two = tmp_path / "two"
    proc = _torchrun("finetune", args(two, 2))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("): 4 steps done") == 1  # rank 0 only ("finetune (antibody, ...): 4 steps done")
    assert json.loads((two / "run_config.json").read_text())["world_size"] == 2
    a, b = _adapter_state(single), _adapter_state(two)
    assert a.keys() == b.keys() and a
    for k in a:
        assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, name=k)
    ws, wt = _csv_weights(single / "suppression_report.csv"), _csv_weights(two / "suppression_report.csv")
    assert ws.keys() == wt.keys()
    for i in ws:
        assert ws[i][0] == wt[i][0], i  # every sample seen as often
        if ws[i][0]:
            assert abs(float(ws[i][1]) - float(wt[i][1])) <= 1e-5 * abs(float(ws[i][1])) + 1e-7, i
    loss_1 = [json.loads(x)["loss"] for x in (single / "metrics.jsonl").read_text().splitlines()]
    loss_2 = [json.loads(x)["loss"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(loss_1) == len(loss_2) == 4
    for x, y in zip(loss_1, loss_2):  # the logged loss is the global one
        assert abs(x - y) <= 1e-5 * abs(x), (x, y)

    part = tmp_path / "part"
    proc = _torchrun("finetune", [*args(part, 2), "--save-every", "1", "--stop-after", "2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (part / "adapter").exists() and (part / "checkpoint.pt").is_file()
    # resuming with another global batch would not continue the data order: refused, nothing written
    assert commands.main("finetune", [*args(part, 2), "--resume"]) == 2
    assert "samples per step" in capsys.readouterr().err
    assert not (part / "adapter").exists()
    assert commands.main("finetune", [*args(part, 4), "--resume"]) == 0
    c = _adapter_state(part)
    for k in a:
        assert_close(c[k], a[k], atol=1e-5, rtol=1e-4, name=k)
    assert _csv_weights(part / "suppression_report.csv").keys() == ws.keys()


def test_torchrun_align_equals_one_process(env, tmp_path):
    from antibody_fast.testing import assert_close

    def args(out, bs):
        return ["--model", env["model"], "--align-data", env["align"], "--harmful-data", env["harmful"],
                "--steps", "2", "--batch-size", str(bs), "--lr", "1e-2", "--momentum", "0.5", "--output", str(out),
                *COMMON]  # fmt: skip

    assert commands.main("align", args(tmp_path / "single", 4)) == 0
    proc = _torchrun("align", args(tmp_path / "two", 2))
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = _adapter_state(tmp_path / "single"), _adapter_state(tmp_path / "two")
    assert a.keys() == b.keys() and a
    for k in a:
        assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, name=k)
    lam = [
        json.loads(x)["lambda_t"] for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    ]
    lam2 = [json.loads(x)["lambda_t"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(lam) == len(lam2) == 2
    for x, y in zip(lam, lam2):
        assert abs(x - y) <= 1e-4 * abs(x), (x, y)


def test_evaluate_refuses_torchrun(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = commands.main(
        "evaluate",
        ["--model", env["model"], "--task", "sst2", "--task-data", env["sst2"], "--output", str(tmp_path)],
    )
    assert rc == 2
    assert "evaluate runs in one process" in capsys.readouterr().err
