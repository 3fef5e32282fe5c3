"""Checkpoint integrity: checksum, options fingerprint, full validation before any change, crafted
entries, non-finite values never written, leftover temporaries cleaned (docs/reliability.md)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_state, full_state, make_finetune_batch, tiny_model

from antibody_fast import checkpoint as ck
from antibody_fast.checkpoint import (
    CheckpointMismatchError,
    NonFiniteCheckpointError,
    cleanup_temporaries,
    load_checkpoint,
    save_checkpoint,
)
from antibody_fast.steps import AlignState, weighted_step


def _setup(seed_step=1):
    model = tiny_model("llama")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    weighted_step(model, make_finetune_batch(3, seed=seed_step), opt, scheduler=sched)
    return model, opt, sched, AlignState()


def _opt_tensors(opt):
    return {(id(p), k): v.clone() for p, s in opt.state.items() for k, v in s.items() if torch.is_tensor(v)}


def _untouched(model, opt, sched):
    before, opt_before, sched_before = full_state(model), _opt_tensors(opt), dict(sched.state_dict())
    rng_before = torch.get_rng_state()

    def check():
        assert_same_state(before, full_state(model))
        assert_same_state(opt_before, _opt_tensors(opt))
        assert sched.state_dict() == sched_before
        assert torch.equal(torch.get_rng_state(), rng_before)

    return check


def _rewrite(path, mutate, *, fix_checksum=True):
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    if fix_checksum:
        payload["checksum"] = ck._checksum(payload)
    torch.save(payload, path)


def test_flipped_byte_in_tensor_data_is_refused(tmp_path):
    model, opt, sched, state = _setup()
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, opt, sched, state)
    other, oopt, osched, _ = _setup(seed_step=2)
    check = _untouched(other, oopt, osched)

    # flip one bit of one parameter value, keep the stored checksum: a silent corruption
    def flip(p):
        name = next(iter(p["params"]))
        t = p["params"][name]
        t.view(-1)[0] = torch.nextafter(t.view(-1)[0], torch.tensor(1e9))

    _rewrite(path, flip, fix_checksum=False)
    with pytest.raises(ValueError, match="does not match its checksum"):
        load_checkpoint(path, other, oopt, osched, AlignState())
    check()


@pytest.mark.parametrize(
    "what, mutate, match",
    [
        (
            "adam state of the wrong shape",
            lambda p: p["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(3)),
            "exp_avg",
        ),
        (
            "optimizer state for an unknown index",
            lambda p: p["optimizer"]["state"].__setitem__(99, {}),
            "unknown",
        ),
        ("scheduler entry not a dict", lambda p: p.__setitem__("scheduler", [1, 2]), "scheduler"),
        ("scheduler entry with other keys", lambda p: p.__setitem__("scheduler", {"x": 1}), "scheduler"),
        ("state entry corrupt", lambda p: p.__setitem__("state", {"lambda_ema": None}), "state"),
        ("rng entry corrupt", lambda p: p["rng"].__setitem__("torch_cpu", torch.zeros(3)), "rng"),
        ("rng python entry corrupt", lambda p: p["rng"].__setitem__("python", 5), "rng"),
    ],
)
def test_crafted_entries_refused_before_any_change(tmp_path, what, mutate, match):
    model, opt, sched, state = _setup()
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, opt, sched, state)
    _rewrite(path, mutate)
    other, oopt, osched, _ = _setup(seed_step=2)
    check = _untouched(other, oopt, osched)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, other, oopt, osched, AlignState())
    check()


def test_failing_apply_rolls_back(tmp_path, monkeypatch):
    """Should an object's own load_state_dict still raise after validation, everything applied is undone."""
    model, opt, sched, state = _setup()
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, opt, sched, state)
    other, oopt, osched, _ = _setup(seed_step=2)
    check = _untouched(other, oopt, osched)

    class BadState(AlignState):
        def load_state_dict(self, sd):
            raise RuntimeError("boom")

    with pytest.raises(ValueError, match="boom"):
        load_checkpoint(path, other, oopt, osched, BadState())
    check()


def test_fingerprint_mismatch_names_the_options(tmp_path):
    model, opt, sched, state = _setup()
    path = tmp_path / "c.pt"
    fp = {"seed": 0, "lr": 1e-3, "method": "antibody"}
    save_checkpoint(path, model, opt, sched, state, fingerprint=fp)
    other, oopt, osched, _ = _setup(seed_step=2)
    check = _untouched(other, oopt, osched)
    with pytest.raises(CheckpointMismatchError, match=r"lr: 0.001 -> 0.01.*seed: 0 -> 1") as e:
        load_checkpoint(path, other, oopt, osched, AlignState(), fingerprint={**fp, "seed": 1, "lr": 1e-2})
    assert e.value.differing == ["lr: 0.001 -> 0.01", "seed: 0 -> 1"]
    check()
    load_checkpoint(path, other, oopt, osched, AlignState(), fingerprint=fp)  # same options: fine
    load_checkpoint(path, other, oopt, osched, AlignState(), fingerprint={**fp, "seed": 1}, force=True)


def test_nonfinite_checkpoint_never_written(tmp_path):
    model, opt, sched, state = _setup()
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, opt, sched, state)
    good = path.read_bytes()
    p = next(p for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match="non-finite"):
        save_checkpoint(path, model, opt, sched, state)
    assert path.read_bytes() == good  # the last good checkpoint is kept
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".tmp-")]
    with torch.no_grad():
        p.view(-1)[0] = 0.0
    st = AlignState()
    st.lambda_ema = torch.tensor(float("inf"))
    with pytest.raises(NonFiniteCheckpointError, match="state"):
        save_checkpoint(path, model, opt, sched, st)


def test_leftover_temporaries_cleaned(tmp_path):
    model, opt, sched, state = _setup()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, opt, sched, state)
    left = [tmp_path / ".tmp-checkpoint.pt.abc123", tmp_path / ".tmp-checkpoint.pt.zz"]
    for f in left:
        f.write_bytes(b"partial")
    unrelated = tmp_path / ".tmp-other.pt.x"
    unrelated.write_bytes(b"keep")
    removed = cleanup_temporaries(path)
    assert sorted(removed) == sorted(str(f) for f in left)
    assert not any(f.exists() for f in left) and unrelated.exists() and path.exists()
