# ruff: noqa: NPY002 -- the checkpoint saves and restores the legacy global NumPy RNG, so the test uses it
"""save_checkpoint / load_checkpoint: resume equivalence, RNG state, atomic writes, bad checkpoints."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from helpers import assert_same_state, full_state, make_align_batch, make_finetune_batch, tiny_model

from antibody_fast.checkpoint import load_checkpoint, save_checkpoint
from antibody_fast.steps import AlignConfig, AlignState, align_step, weighted_step


def _setup():
    model = tiny_model("llama")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    return model, opt, sched, AlignState()


def _run(model, opt, sched, state, start, stop):
    cfg = AlignConfig(momentum=0.5)
    for step in range(start, stop):
        # the data of each step is drawn from the global RNGs, so restoring them matters
        seed = int(torch.randint(0, 10_000, ())) + random.randrange(1000) + int(np.random.randint(1000))
        if step % 2 == 0:
            align_step(model, make_align_batch(seed=seed), opt, state, cfg, scheduler=sched)
        else:
            weighted_step(model, make_finetune_batch(3, seed=seed), opt, scheduler=sched)


def _seed_all(s):
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path):
    path = tmp_path / "ckpt.pt"
    _seed_all(0)
    m1, o1, s1, st1 = _setup()
    _run(m1, o1, s1, st1, 0, 3)
    save_checkpoint(path, m1, o1, s1, st1, extra={"step": 3})
    _run(m1, o1, s1, st1, 3, 5)

    _seed_all(123)  # a different process state: everything must come from the checkpoint
    m2, o2, s2, st2 = _setup()
    extra = load_checkpoint(path, m2, o2, s2, st2)
    assert extra == {"step": 3}
    assert st2.step == 2 and st2.lambda_ema is not None  # align steps 0 and 2
    _run(m2, o2, s2, st2, 3, 5)

    assert_same_state(full_state(m1), full_state(m2))
    assert st1.step == st2.step == 3
    assert torch.equal(st1.lambda_ema, st2.lambda_ema)
    assert s1.get_last_lr() == s2.get_last_lr()
    for a, b in zip(o1.state_dict()["state"].values(), o2.state_dict()["state"].values()):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_rng_states_restored(tmp_path):
    path = tmp_path / "rng.pt"
    model, opt, _, _ = _setup()
    _seed_all(7)
    save_checkpoint(path, model, opt)
    expected = (torch.rand(3), random.random(), np.random.rand())
    _seed_all(99)
    load_checkpoint(path, model, opt)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model, opt, sched, state = _setup()
    save_checkpoint(path, model, opt, sched, state, extra={"v": 1})
    old = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, sched, state, extra={"v": 2})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["ckpt.pt"], "the temporary file was not cleaned up"
    monkeypatch.undo()
    save_checkpoint(path, model, opt, sched, state, extra={"v": 3})  # replaces the existing file
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(path, model, opt, sched, state) == {"v": 3}


def test_missing_corrupt_or_mismatched_checkpoint_leaves_model_untouched(tmp_path):
    model, opt, sched, state = _setup()
    weighted_step(model, make_finetune_batch(3, seed=1), opt)  # non-empty optimizer state
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, opt, sched, state)

    other, other_opt, _, _ = _setup()
    weighted_step(other, make_finetune_batch(3, seed=2), other_opt)
    before = full_state(other)
    opt_before = {k: v.clone() for s in other_opt.state.values() for k, v in s.items() if torch.is_tensor(v)}

    def check_untouched():
        assert_same_state(before, full_state(other))
        after = {k: v.clone() for s in other_opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
        assert_same_state(opt_before, after)

    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt", other, other_opt)
    check_untouched()

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(corrupt, other, other_opt)
    check_untouched()

    garbage = tmp_path / "garbage.pt"
    torch.save({"hello": 1}, garbage)
    with pytest.raises(ValueError, match="not an antibody_fast checkpoint"):
        load_checkpoint(garbage, other, other_opt)
    check_untouched()

    rank8 = tiny_model("llama", r=8)
    mismatch = tmp_path / "rank8.pt"
    save_checkpoint(mismatch, rank8)
    with pytest.raises(ValueError, match="lora"):
        load_checkpoint(mismatch, other, other_opt)
    check_untouched()


def test_optimizer_requested_but_not_saved(tmp_path):
    model, opt, _, _ = _setup()
    path = tmp_path / "weights_only.pt"
    save_checkpoint(path, model)
    before = full_state(model)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, model, opt)
    assert_same_state(before, full_state(model))
    load_checkpoint(path, model)  # weights only: fine
