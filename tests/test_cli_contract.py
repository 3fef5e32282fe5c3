"""The CLI's error contract: every user error is one line on stderr and exit 2, with no traceback
and nothing written; one run per --output; resume tied to its run; no non-finite checkpoint or adapter."""

from __future__ import annotations

import fcntl
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_train_cli import make_cli_env  # noqa: E402

from antibody_fast.cli import commands  # noqa: E402

COMMON = ["--max-length", "320", "--lora-r", "2", "--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    files = make_cli_env(tmp_path_factory.mktemp("contract"))
    root = files["root"]
    bad = root / "latin1.jsonl"
    bad.write_bytes('{"sentence": "caf\xe9", "label": 1}\n'.encode("latin-1"))
    files["latin1"] = str(bad)
    deep = root / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    files["deep"] = str(deep)
    return files


def _align(env, out, *extra):
    return [
        "--model", env["model"], "--align-data", env["align"], "--harmful-data", env["harmful"], "--steps", "2",
        "--batch-size", "2", "--output", str(out), *COMMON, *extra,
    ]  # fmt: skip


def _finetune(env, out, *extra, task_data=None):
    return [
        "--model", env["model"], "--task", "sst2", "--task-data", task_data or env["sst2"], "--harmful-data",
        env["harmful"], "--harmful-ratio", "0.25", "--num-samples", "8", "--batch-size", "4", "--steps", "2",
        "--output", str(out), *COMMON, *extra,
    ]  # fmt: skip


def _expect_exit2(capsys, command, argv, match, out=None, written_before=None):
    rc = commands.main(command, argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    # transformers may print a "Loading weights" progress bar before; the error itself is one line
    lines = [x for x in err.splitlines() if f"antibody-fast {command}: error:" in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert err.rstrip().endswith(lines[0].strip()), err
    assert match.lower() in lines[0].lower(), lines[0]
    if out is not None:
        now = sorted(os.listdir(out)) if os.path.isdir(out) else None
        assert now == written_before, f"files were written: {now} (before: {written_before})"
    return lines[0]


@pytest.mark.parametrize(
    "name, argv_extra, match",
    [
        ("eta nan", ["--eta", "nan"], "eta"),
        ("rho -1", ["--rho", "-1"], "rho"),
        ("momentum 1", ["--momentum", "1"], "momentum"),
        ("lora alpha nan", ["--lora-alpha", "nan"], "lora-alpha"),
        ("weight decay 1e30", ["--weight-decay", "1e30"], "weight-decay"),
        ("triton on cpu", ["--impl", "triton", "--device", "cpu"], "triton"),
        ("device mps", ["--device", "mps"], "mps"),
        ("amp fp16 (no grad scaler)", ["--amp", "fp16"], "grad scaler"),
    ],
)
def test_bad_align_options_exit2_nothing_written(env, tmp_path, capsys, name, argv_extra, match):
    if name == "triton on cpu":
        import importlib.util

        if importlib.util.find_spec("triton") is not None:
            pytest.skip("triton is installed: --impl triton runs on the CPU through its interpreter")
    out = tmp_path / "out"
    _expect_exit2(capsys, "align", _align(env, out, *argv_extra), match, out=str(out), written_before=None)


def test_amp_fp16_refused_by_finetune_too(env, tmp_path, capsys):
    out = tmp_path / "out"
    _expect_exit2(capsys, "finetune", _finetune(env, out, "--amp", "fp16"), "grad scaler", str(out), None)


def test_impl_triton_without_triton_exit2_simulated(env, tmp_path, capsys, monkeypatch):
    """``--impl triton`` where triton cannot run (simulated: on this machine triton is installed and runs on
    the CPU through its interpreter): exit 2, one line, nothing written."""
    from antibody_fast import dispatch

    monkeypatch.setattr(
        dispatch, "_triton_import_error", lambda: "triton is not importable (ModuleNotFoundError: simulated)"
    )
    out = tmp_path / "out"
    _expect_exit2(capsys, "align", _align(env, out, "--impl", "triton"), "triton", str(out), None)


def test_non_utf8_and_deep_json_exit2(env, tmp_path, capsys):
    out = tmp_path / "out"
    _expect_exit2(capsys, "finetune", _finetune(env, out, task_data=env["latin1"]), "utf", str(out), None)
    _expect_exit2(capsys, "finetune", _finetune(env, out, task_data=env["deep"]), "", str(out), None)


def test_read_only_output_exit2(env, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _expect_exit2(capsys, "align", _align(env, ro / "out"), "permission")
    finally:
        ro.chmod(0o700)


def test_unwritable_output_exit2_simulated(env, tmp_path, capsys, monkeypatch):
    """The read-only ``--output`` case where directory permissions cannot be used (root ignores them): the
    directory creation fails with EACCES, as it would there."""
    import errno

    target = str(tmp_path / "ro" / "out")
    real = os.makedirs

    def denied(path, *a, **k):
        if os.fspath(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", denied)
    _expect_exit2(capsys, "align", _align(env, target), "permission", out=target, written_before=None)


def test_second_run_into_same_output_exit2(env, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another run holds the lock
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        _expect_exit2(capsys, "align", _align(env, out), "in use by another")
    assert not (out / "checkpoint.pt").exists()
    assert commands.main("align", _align(env, out)) == 0  # the lock was released with its holder


@pytest.fixture()
def finished_align(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert commands.main("align", _align(env, out, "--save-every", "1")) == 0, capsys.readouterr().err
    capsys.readouterr()
    return out


def test_resume_with_other_options_exit2_and_force_records(env, finished_align, capsys):
    out = finished_align
    ck_before = (out / "checkpoint.pt").read_bytes()
    line = _expect_exit2(
        capsys, "align", _align(env, out, "--resume", "--steps", "3", "--lr", "0.5"), "lr: 0.0001 -> 0.5"
    )
    assert (out / "checkpoint.pt").read_bytes() == ck_before
    _expect_exit2(capsys, "align", _align(env, out, "--resume", "--steps", "3", "--seed", "7"), "seed")
    _expect_exit2(capsys, "align", _align(env, out, "--resume", "--steps", "3", "--lora-r", "4"), "lora_r")
    assert "lr" in line
    rc = commands.main("align", _align(env, out, "--resume", "--steps", "3", "--seed", "7", "--force"))
    assert rc == 0, capsys.readouterr().err
    rec = [json.loads(x) for x in (out / "resume_overrides.jsonl").read_text().splitlines()]
    assert rec and any(d.startswith("seed: 0 -> 7") for d in rec[-1]["differing"])


def test_resume_steps_below_completed_exit2(env, finished_align, capsys):
    ck_before = (finished_align / "checkpoint.pt").read_bytes()
    _expect_exit2(
        capsys, "align", _align(env, finished_align, "--resume", "--steps", "1"), "already completed 2"
    )
    assert (finished_align / "checkpoint.pt").read_bytes() == ck_before


def test_truncated_checkpoint_exit2(env, finished_align, capsys):
    ck = finished_align / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    _expect_exit2(
        capsys, "align", _align(env, finished_align, "--resume", "--steps", "3"), "not a readable checkpoint"
    )


def test_leftover_temporaries_cleaned_at_start(env, finished_align, capsys):
    left = finished_align / ".tmp-checkpoint.pt.k1ll3d"
    left.write_bytes(b"partial")
    assert commands.main("align", _align(env, finished_align, "--resume", "--steps", "3")) == 0
    assert not left.exists()


def test_full_disk_exit2_keeps_last_checkpoint(env, finished_align, capsys, monkeypatch):
    import errno

    from antibody_fast import checkpoint as ck

    ck_before = (finished_align / "checkpoint.pt").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full)
    _expect_exit2(capsys, "align", _align(env, finished_align, "--resume", "--steps", "3"), "no space left")
    assert (finished_align / "checkpoint.pt").read_bytes() == ck_before


def test_nonfinite_run_exit2_keeps_last_good_checkpoint(env, tmp_path, capsys, monkeypatch):
    """Every step non-finite: the guard skips them, the run stops with exit 2 after max_consecutive_skips,
    and no checkpoint or adapter with NaN is written (the last good one stays)."""
    from antibody_fast.steps import align as align_module

    out = tmp_path / "nan"
    assert commands.main("align", _align(env, out, "--save-every", "1")) == 0
    capsys.readouterr()
    ck_before = (out / "checkpoint.pt").read_bytes()
    adapter_before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    real = align_module.token_mean_loss

    def nan_loss(*a, **k):
        loss, o = real(*a, **k)
        return loss * float("nan"), o

    monkeypatch.setattr(align_module, "token_mean_loss", nan_loss)
    # the default AlignConfig.max_consecutive_skips is 10: the 11th NaN step raises
    _expect_exit2(
        capsys,
        "align",
        _align(env, out, "--resume", "--steps", "20", "--save-every", "1"),
        "consecutive steps were skipped",
    )
    sd = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(bool(torch.isfinite(t).all()) for t in sd["params"].values())
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before
    assert sd["extra"]["step"] == 12  # checkpoints of the skipped steps hold the last good parameters
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    params_before = torch.load(__import__("io").BytesIO(ck_before), weights_only=True)["params"]
    assert all(torch.equal(params_before[k], sd["params"][k]) for k in params_before)


def test_evaluate_judge_kind(env, tmp_path, capsys):
    """A causal LM passed as a classifier judge is refused (exit 2, no eval.json); as --judge-kind causal-lm it
    judges, and eval.json names it."""
    args = ["--model", env["model"], "--harmful-prompts", env["harmful"], "--num-eval", "2", "--max-new-tokens", "2",
            "--batch-size", "2", "--no-progress", "--judge-model", env["model"]]  # fmt: skip
    out = tmp_path / "ev"
    _expect_exit2(
        capsys, "evaluate", [*args, "--output", str(out)], "not a sequence classifier", str(out), None
    )
    rc = commands.main("evaluate", [*args, "--output", str(out), "--judge-kind", "causal-lm"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    assert result["judge"].startswith("causal-lm:") and result["judge_is_proxy"] is False
    assert 0.0 <= result["hs"] <= 100.0
