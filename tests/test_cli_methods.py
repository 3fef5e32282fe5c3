"""The command line runs every method of the paper's tables (``align --method antibody|booster|vaccine|sft``,
``finetune --method antibody|sft|lisa``), adapter continuation (``--adapter-mode``), ``--recipe paper`` with
override precedence and ``--dry-run``, the logged combined alignment loss, data flags (``--refusals``,
``--truncation``, ``--drop-overlong``, ``--epochs``), resume and torchrun for the baselines.

Tiny random model and placeholder data from ``tests/test_train_cli.py``'s fixture (no harmful text)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_train_cli import COMMON, _adapter_state, _finetune_args, _jsonl, _torchrun, make_cli_env  # noqa: E402

from antibody_fast.cli import commands  # noqa: E402
from antibody_fast.models import ADAPTER_METADATA  # noqa: E402
from antibody_fast.testing import assert_close  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_cli_env(tmp_path_factory.mktemp("cli"))


def _align_args(env, out, method, *extra):
    args = ["--model", env["model"], "--align-data", env["align"], "--steps", "2", "--batch-size", "2",
            "--output", str(out), "--method", method, *COMMON, *extra]  # fmt: skip
    if method in ("antibody", "booster"):
        args += ["--harmful-data", env["harmful"]]
    return args


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _run_config(out):
    return json.loads((out / "run_config.json").read_text())


@pytest.fixture(scope="module")
def adapters(env, tmp_path_factory):
    """Alignment adapters made by `align --method antibody` and `--method vaccine` (2 steps, lr 1e-2)."""
    root = tmp_path_factory.mktemp("aligned")
    out = {}
    for method in ("antibody", "vaccine"):
        assert commands.main("align", _align_args(env, root / method, method, "--lr", "1e-2")) == 0
        out[method] = root / method
    return out


# ------------------------------------------------------------------------------------------------ align
@pytest.mark.parametrize("method", ["antibody", "booster", "vaccine", "sft"])
def test_align_every_method(env, tmp_path, method, capsys):
    out = tmp_path / method
    assert commands.main("align", _align_args(env, out, method)) == 0, capsys.readouterr().err
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    cfg = _run_config(out)
    assert cfg["method"] == method
    meta = json.loads((out / "adapter" / ADAPTER_METADATA).read_text())
    assert meta["command"] == "align" and meta["method"] == method
    if method == "antibody":
        assert cfg["rule"] == "cosine" and cfg["lambda_ref"] == 0.05
        for r in rows:  # the logged objective of δ next to L_A, from the same step's values
            expected = r["loss_align"] + r["lambda_t"] * (r["loss_harmful"] - r["loss_perturbed"])
            expected += 0.05 * r["loss_refusal"]
            assert r["loss_combined"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
            assert r["loss_combined"] != r["loss_align"]
    elif method == "booster":
        assert cfg["rule"] == "constant" and cfg["lambda_ref"] == 0.0
        for r in rows:
            assert "loss_refusal" not in r and r["lambda_t"] == 5.0
            expected = r["loss_align"] + 5.0 * (r["loss_harmful"] - r["loss_perturbed"])
            assert r["loss_combined"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    elif method == "vaccine":
        assert all("clean_loss" in r and r["perturbation_grad_norm"] > 0 for r in rows)
    else:
        assert all("lambda_t" not in r and r["loss"] > 0 for r in rows)


def test_align_step_loss_combined_unit():
    """StepStats.loss_combined of align_step = L_A + λ_t (L_H − L_P) + λ_ref L_R, on device, every rule."""
    from helpers import make_align_batch, tiny_model

    from antibody_fast.steps import AlignConfig, AlignState, align_step

    for cfg in (
        AlignConfig(lambda_ref=0.3),
        AlignConfig(rule="constant", lambda_ref=0.0),
        AlignConfig(rule="none"),
    ):
        model = tiny_model("llama")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        s = align_step(model, make_align_batch(), opt, AlignState(), cfg)
        if cfg.rule == "none":
            assert s.loss_combined is s.loss_align
            continue
        exp = s.loss_align + s.lambda_t * (s.loss_harmful - s.loss_perturbed)
        if cfg.lambda_ref:
            exp = exp + cfg.lambda_ref * s.loss_refusal
        assert_close(s.loss_combined, exp, name=f"loss_combined ({cfg.rule})")


# --------------------------------------------------------------------------------------------- finetune
def _lora(state, kind):
    return {k: v for k, v in state.items() if f"lora_{kind}" in k}


@pytest.mark.parametrize(
    "made_by, method, mode_flag, expected",
    [
        ("antibody", "antibody", None, "continue"),  # default after antibody: keep training its adapter
        ("vaccine", "sft", None, "merge"),  # default after vaccine (from the adapter's metadata)
        ("antibody", "sft", "merge", "merge"),  # explicit overrides
        ("vaccine", "antibody", "continue", "continue"),
    ],
)
def test_finetune_adapter_modes(env, adapters, tmp_path, made_by, method, mode_flag, expected):
    """lr 0: the fine-tuned adapter is the one fine-tuning started from. continue: the alignment adapter itself
    (non-zero B); merge: a fresh adapter (B = 0)."""
    out = tmp_path / "ft"
    extra = ["--adapter", str(adapters[made_by] / "adapter"), "--method", method, "--lr", "0", "--steps", "1"]
    if mode_flag:
        extra += ["--adapter-mode", mode_flag]
    assert commands.main("finetune", _finetune_args(env, out, *extra)) == 0
    cfg = _run_config(out)
    assert cfg["adapter_mode"] == expected, cfg["adapter_mode_reason"]
    got, aligned = _adapter_state(out), _adapter_state(adapters[made_by])
    b = _lora(got, "B")
    assert b
    if expected == "continue":
        assert got.keys() == aligned.keys()
        for k in aligned:
            assert torch.equal(got[k], aligned[k]), k
        assert any(float(v.abs().max()) > 0 for v in b.values())
    else:
        assert all(torch.equal(v, torch.zeros_like(v)) for v in b.values())
    meta = json.loads((out / "adapter" / ADAPTER_METADATA).read_text())
    assert meta == {**meta, "command": "finetune", "method": method, "adapter_mode": expected}


def test_finetune_continue_trains_the_alignment_adapter(env, adapters, tmp_path):
    out = tmp_path / "ft"
    args = _finetune_args(env, out, "--adapter", str(adapters["antibody"] / "adapter"), "--steps", "1")
    assert commands.main("finetune", [*args, "--lr", "1e-2"]) == 0
    got, aligned = _adapter_state(out), _adapter_state(adapters["antibody"])
    assert got.keys() == aligned.keys()
    assert any(not torch.equal(got[k], aligned[k]) for k in _lora(aligned, "B"))


def test_finetune_lisa(env, tmp_path):
    out = tmp_path / "lisa"
    args = _finetune_args(env, out, "--method", "lisa", "--align-data", env["align"], "--steps", "6",
                          "--lisa-align-steps", "1", "--lisa-finetune-steps", "2", "--lisa-rho", "1.0",
                          "--lisa-warmup-fraction", "0.5", "--lr", "1e-2")  # fmt: skip
    assert commands.main("finetune", args) == 0
    rows = _metrics(out)
    assert [r["lisa_phase"] for r in rows] == ["align", "finetune", "finetune"] * 2
    assert all("proximal" in r and "weight_mean" not in r for r in rows)
    cfg = _run_config(out)
    assert cfg["lisa"]["total_steps"] == 6 and cfg["lisa_warmup_fraction"] == 0.5
    assert not (out / "suppression_report.csv").exists()


def test_method_options_are_checked(env, tmp_path, capsys):
    def err(command, args):
        assert commands.main(command, args) == 2
        return capsys.readouterr().err

    assert "option of --method antibody / booster, not of vaccine" in err(
        "align", _align_args(env, tmp_path / "o", "vaccine", "--eta", "3")
    )
    assert "no refusal term" in err(
        "align", _align_args(env, tmp_path / "o", "booster", "--lambda-ref", "0.1")
    )
    assert "uses --rule constant" in err(
        "align", _align_args(env, tmp_path / "o", "booster", "--rule", "cosine")
    )
    assert "--method antibody needs --harmful-data" in err(
        "align", ["--model", env["model"], "--align-data", env["align"], "--output", str(tmp_path / "o")]
    )
    assert "--method lisa needs --align-data" in err(
        "finetune", _finetune_args(env, tmp_path / "o", "--method", "lisa")
    )
    assert "option of --method lisa" in err(
        "finetune", _finetune_args(env, tmp_path / "o", "--lisa-rho", "1")
    )
    assert "--adapter-mode needs --adapter" in err(
        "finetune", _finetune_args(env, tmp_path / "o", "--adapter-mode", "merge")
    )
    assert not (tmp_path / "o").exists()


def test_continue_refuses_contradicting_lora_options(env, adapters, tmp_path, capsys):
    """The adapters were made with --lora-r 2 (COMMON): the same value is fine, another one would be ignored."""
    args = _finetune_args(env, tmp_path / "o", "--adapter", str(adapters["antibody"] / "adapter"))
    args[args.index("--lora-r") + 1] = "4"
    assert commands.main("finetune", args) == 2
    assert "--lora-r 4 differs from the adapter's 2" in capsys.readouterr().err
    assert commands.main("finetune", [*args, "--adapter-mode", "merge", "--dry-run"]) == 0  # a fresh r=4 LoRA
    assert json.loads(capsys.readouterr().out)["adapter_mode"] == "merge"
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- recipes
def test_recipe_paper_and_precedence(tmp_path):
    opts, src, _ = commands.resolve_options("align", ["--recipe", "paper"], allow_missing=True)
    expected = {"lora_r": 32, "lora_alpha": 4.0, "lora_targets": ["q_proj", "k_proj", "v_proj"],
                "weight_decay": 0.1, "lr_scheduler": "constant", "lr": 5e-4, "batch_size": 16, "max_length": 256,
                "epochs": 20, "steps": None, "seed": 5, "dtype": "bfloat16", "eta": 5.0, "rho": 0.1,
                "lambda_ref": 0.05, "momentum": 0.99, "truncation": "right"}  # fmt: skip
    assert {k: opts[k] for k in expected} == expected
    assert src["lr"] == "recipe paper" and src["impl"] == "default"
    ft, _, _ = commands.resolve_options("finetune", ["--recipe", "paper"], allow_missing=True)
    assert ft["lr"] == 1e-5 and ft["tau"] == 1.0 and ft["epochs"] == 20
    default, _, _ = commands.resolve_options("finetune", [], allow_missing=True)
    assert (
        default["lr"] == 1e-4
        and default["lora_r"] == 8
        and default["steps"] == 100
        and default["epochs"] is None
    )
    # config file over the recipe, flags over both; the later layer decides steps vs epochs
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"recipe": "paper", "lora_r": 16, "lr": 1e-3, "steps": 7}))
    opts, src, _ = commands.resolve_options(
        "align", ["--config", str(cfg), "--lr", "2e-3"], allow_missing=True
    )
    assert opts["lora_r"] == 16 and src["lora_r"] == f"config {cfg}"
    assert opts["lr"] == 2e-3 and src["lr"] == "command line"
    assert opts["steps"] == 7 and opts["epochs"] is None and opts["batch_size"] == 16
    opts, _, _ = commands.resolve_options(
        "align", ["--config", str(cfg), "--epochs", "3"], allow_missing=True
    )
    assert opts["epochs"] == 3 and opts["steps"] is None
    opts, _, _ = commands.resolve_options("align", ["--recipe", "paper", "--steps", "5"], allow_missing=True)
    assert opts["steps"] == 5 and opts["epochs"] is None
    with pytest.raises(commands.CLIError, match="--steps or --epochs, not both"):
        commands.resolve_options("align", ["--steps", "5", "--epochs", "2"], allow_missing=True)
    # the recipe's lambda_ref is not a user choice: booster still gets 0
    opts, src, _ = commands.resolve_options(
        "align", ["--recipe", "paper", "--method", "booster"], allow_missing=True
    )
    assert opts["lambda_ref"] == 0.0 and opts["rule"] == "constant"


def test_dry_run_prints_the_resolved_configuration(tmp_path, capsys):
    out = tmp_path / "never"
    assert (
        commands.main("align", ["--recipe", "paper", "--dry-run", "--output", str(out), "--lr", "1e-3"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["command"] == "align" and printed["recipe"] == "paper"
    assert printed["options"]["lora_r"] == 32 and printed["options"]["lr"] == 1e-3
    assert printed["sources"]["lora_r"] == "recipe paper" and printed["sources"]["lr"] == "command line"
    assert printed["missing"] and "--model" in printed["missing"][0]
    assert "20 epochs" in printed["steps_rule"]
    assert not out.exists()
    assert commands.main("finetune", ["--recipe", "paper", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["options"]["lr"] == 1e-5


def test_help_names_each_recipe_default(capsys):
    assert commands.main("align", ["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8; --recipe paper: 32)" in text and "--recipe paper: 0.0005" in text
    assert "--method" in text and "--vaccine-rho" in text
    assert commands.main("finetune", ["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--recipe paper: 1e-05" in text and "--adapter-mode" in text and "--lisa-warmup-fraction" in text


# ------------------------------------------------------------------------------------------- data flags
def test_epochs_refusals_truncation(env, tmp_path):
    out = tmp_path / "ep"
    steps_args = _finetune_args(env, out, "--epochs", "1")
    steps_args.remove("--steps")
    steps_args.remove("4")
    assert commands.main("finetune", steps_args) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2]  # 8 samples / batch 4
    assert _run_config(out)["steps"] == 2
    pool = tmp_path / "refusals.txt"
    pool.write_text("No, I will not do that.\nThat is something I refuse to write.\n")
    d = {}
    for name, extra in (
        ("shipped", ()),
        ("file", ("--refusals", str(pool))),
        ("left", ("--truncation", "left")),
    ):
        o = tmp_path / name
        assert commands.main("finetune", _finetune_args(env, o, "--steps", "1", *extra)) == 0
        d[name] = _metrics(o)[0]["d_mean"]
    assert d["file"] != d["shipped"]  # the refusals scored are the file's
    assert _run_config(tmp_path / "left")["truncation"] == "left"


def test_drop_overlong(env, tmp_path, capsys):
    recs = [{"prompt": ("long " * 80 if i in (1, 4) else "") + f"placeholder request {i}",
             "refusal": "Sorry, I cannot help with that."} for i in range(6)]  # fmt: skip
    path = _jsonl(tmp_path / "align_long.jsonl", recs)
    args = _align_args(env, tmp_path / "o", "sft")
    args[args.index("--align-data") + 1] = path
    assert commands.main("align", args) == 2
    assert "drop_overlong" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert commands.main("align", [*args, "--drop-overlong"]) == 0
    assert "left out 2 align samples" in capsys.readouterr().err
    cfg = _run_config(tmp_path / "o")
    assert cfg["dropped_overlong"] == {"align": 2} and cfg["num_align_used"] == 4


# ---------------------------------------------------------------------------------------- resume, DDP
@pytest.mark.parametrize(
    "command, method", [("align", "booster"), ("align", "vaccine"), ("finetune", "lisa")]
)
def test_resume_equals_uninterrupted(env, tmp_path, command, method):
    def args(out):
        if command == "align":
            return (
                _align_args(env, out, method, "--lr", "1e-2", "--steps", "3", "--momentum", "0.5")
                if (method == "booster")
                else _align_args(env, out, method, "--lr", "1e-2", "--steps", "3")
            )
        return _finetune_args(env, out, "--method", "lisa", "--align-data", env["align"], "--lr", "1e-2",
                              "--lisa-align-steps", "1", "--lisa-finetune-steps", "1", "--lisa-rho", "1.0",
                              "--lisa-warmup-fraction", "0.2")  # fmt: skip

    assert commands.main(command, args(tmp_path / "full")) == 0
    assert commands.main(command, [*args(tmp_path / "part"), "--stop-after", "2"]) == 0
    assert commands.main(command, [*args(tmp_path / "part"), "--resume"]) == 0
    a, b = _adapter_state(tmp_path / "full"), _adapter_state(tmp_path / "part")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in _metrics(tmp_path / "full")] == [
        r["loss"] for r in _metrics(tmp_path / "part")
    ]


def test_resume_refuses_another_method(env, tmp_path, capsys):
    out = tmp_path / "o"
    assert commands.main("align", [*_align_args(env, out, "vaccine"), "--stop-after", "1"]) == 0
    assert commands.main("align", [*_align_args(env, out, "sft"), "--resume"]) == 2
    # the options fingerprint refuses it first, naming the method among the differing options
    assert "method: 'vaccine' -> 'sft'" in capsys.readouterr().err


@pytest.mark.parametrize("command, method", [("align", "vaccine"), ("finetune", "lisa")])
def test_torchrun_baselines_equal_one_process(env, tmp_path, command, method):
    """2 gloo processes x batch 2 = one process x batch 4, for Vaccine's two passes (global ||g|| of the
    attention-output gradients) and Lisa's alternation (reduced gradients, the same anchor on every rank)."""

    def args(out, bs):
        if command == "align":
            a = _align_args(env, out, method, "--lr", "1e-2", "--steps", "3")
        else:
            a = _finetune_args(env, out, "--method", "lisa", "--align-data", env["align"], "--lr", "1e-2",
                               "--lisa-align-steps", "1", "--lisa-finetune-steps", "1", "--lisa-rho", "1.0",
                               "--lisa-warmup-fraction", "0.2")  # fmt: skip
        a[a.index("--batch-size") + 1] = str(bs)
        return a

    assert commands.main(command, args(tmp_path / "single", 4)) == 0
    proc = _torchrun(command, args(tmp_path / "two", 2))
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = _adapter_state(tmp_path / "single"), _adapter_state(tmp_path / "two")
    assert a.keys() == b.keys() and a
    for k in a:
        assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, name=k)
    l1 = [r["loss"] for r in _metrics(tmp_path / "single")]
    l2 = [r["loss"] for r in _metrics(tmp_path / "two")]
    assert len(l1) == len(l2) and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(l1, l2)), (l1, l2)
