"""Reliability: the non-finite guard, stale flat parameters, optimizer sanity, option refusal (docs/reliability.md).

Each test here reproduces one failure mode (NaN batches, stale flat buffers, wrong optimizers, options that can
only give non-finite results) and shows that it is guarded.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import make_align_batch, make_finetune_batch, tiny_model, trainable_params

from antibody_fast.baselines import LisaConfig, LisaState, VaccineConfig, vaccine_step
from antibody_fast.baselines import lisa_step as _lisa_step
from antibody_fast.guard import NonFiniteError
from antibody_fast.steps import AlignConfig, AlignState, FinetuneConfig, align_step, sft_step, weighted_step

POISON = 2  # token id whose (frozen) embedding row is set to NaN: any batch containing it gives NaN losses


def _poison_model(model):
    emb = model.get_input_embeddings()
    with torch.no_grad():
        emb.weight[POISON] = float("nan")
    return model


def _poison_lm(b):
    ids = b.input_ids.clone()
    ids[0, b.prompt_len] = POISON  # first answer column of sample 0: a real token
    return dataclasses.replace(b, input_ids=ids)


def _opt_snapshot(opt):
    sd = opt.state_dict()
    out = {}
    for i, s in sd["state"].items():
        for k, v in s.items():
            out[(i, k)] = v.clone() if torch.is_tensor(v) else v
    return out


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ {sorted(map(str, a))} vs {sorted(map(str, b))}"
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), f"{what}: {k} changed"
        else:
            assert a[k] == b[k], f"{what}: {k} changed"


def _all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


# --- one runner per step kind: (model, optimizer, run(batch_kind, poisoned) -> stats, state snapshot) ---------
class _Runner:
    def __init__(self, kind: str, **cfg):
        self.kind = kind
        self.model = _poison_model(tiny_model("llama"))
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)
        self.align_state = AlignState()
        self.lisa_state = LisaState()
        self.cfg = cfg
        self.i = 0

    def step(self, poisoned: bool = False):
        self.i += 1
        k = self.kind
        if k in ("weighted", "sft"):
            b = make_finetune_batch(3, seed=10 + self.i)
            if poisoned:
                b = _poison_lm(b)
            if k == "weighted":
                return weighted_step(self.model, b, self.opt, FinetuneConfig(**self.cfg))
            return sft_step(self.model, b.answer_view(), self.opt, FinetuneConfig(**self.cfg))
        if k in ("align", "booster", "align_perturbed_only"):
            ab = make_align_batch(seed=20 + self.i)
            if poisoned and k == "align_perturbed_only":
                ab = dataclasses.replace(ab, harmful=_poison_lm(ab.harmful))
            elif poisoned:
                ab = dataclasses.replace(ab, align=_poison_lm(ab.align))
            extra = {"rule": "constant", "lambda_ref": 0.0} if k == "booster" else {}
            return align_step(self.model, ab, self.opt, self.align_state, AlignConfig(**extra, **self.cfg))
        b = make_finetune_batch(3, seed=30 + self.i).answer_view()
        if poisoned:
            b = _poison_lm(b)
        if k == "vaccine":
            return vaccine_step(self.model, b, self.opt, VaccineConfig(**self.cfg))
        return _lisa_step(
            self.model, b, self.opt, self.lisa_state, LisaConfig(align_steps=2, finetune_steps=2, **self.cfg)
        )

    def snapshot(self):
        lam = self.align_state.lambda_ema
        return (
            trainable_params(self.model),
            _opt_snapshot(self.opt),
            None if lam is None else lam.clone(),
            None if self.lisa_state.anchor is None else [a.clone() for a in self.lisa_state.anchor],
        )


KINDS = ["weighted", "sft", "align", "booster", "align_perturbed_only", "vaccine", "lisa"]


@pytest.mark.parametrize("kind", KINDS)
def test_nan_batch_is_skipped_state_bit_identical(kind):
    """A batch that produces NaN: the step reports skipped, θ, the AdamW moments and step count, the λ EMA and
    Lisa's anchor are bit-identical, and the next clean step equals the one of a run that never saw it."""
    r = _Runner(kind)
    r.step()  # the optimizer has state to protect
    params, opt_state, lam, anchor = r.snapshot()
    st = r.step(poisoned=True)
    assert st.skipped is not None and bool(st.skipped), "the NaN step was not reported as skipped"
    params2, opt_state2, lam2, anchor2 = r.snapshot()
    _assert_same(params, params2, "parameters")
    _assert_same(opt_state, opt_state2, "optimizer state")
    if lam is not None:
        assert torch.equal(lam, lam2), "the lambda EMA changed"
    if anchor is not None:
        assert all(torch.equal(a, b) for a, b in zip(anchor, anchor2))
    st = r.step()
    assert not bool(st.skipped)
    assert _all_finite(r.model)

    # the same run without the poisoned step (same data seeds for the good steps) ends bit-identical
    ref = _Runner(kind)
    ref.step()
    ref.i += 1  # skip the poisoned batch's seed
    if kind == "lisa":
        ref.lisa_state.step += 1  # the skipped step still advanced the Lisa schedule
    if kind in ("align", "booster", "align_perturbed_only"):
        ref.align_state.step += 1
    ref.step()
    _assert_same(
        trainable_params(ref.model), trainable_params(r.model), "params vs a run without the NaN batch"
    )
    ref_opt, opt_now = _opt_snapshot(ref.opt), _opt_snapshot(r.opt)
    _assert_same(ref_opt, opt_now, "optimizer state vs a run without the NaN batch")


def test_nan_without_guard_poisons_everything():
    """What the guard prevents (and what today's code did): with guard_nonfinite=False the NaN spreads."""
    r = _Runner("weighted", guard_nonfinite=False)
    r.step()
    st = r.step(poisoned=True)
    assert st.skipped is None
    assert not _all_finite(r.model)


def test_skipped_first_step_leaves_fresh_optimizer():
    r = _Runner("weighted")
    before = trainable_params(r.model)
    st = r.step(poisoned=True)
    assert bool(st.skipped)
    _assert_same(before, trainable_params(r.model), "parameters")
    assert len(r.opt.state) == 0, "a skipped first step left optimizer state behind"


def test_align_first_step_skipped_then_ema_starts_at_raw():
    r = _Runner("align")
    r.step(poisoned=True)
    assert r.align_state.state_dict()["lambda_ema"] is None  # not started
    st = r.step()
    assert not bool(st.skipped)
    assert torch.equal(st.lambda_t, st.lambda_raw)  # the EMA starts at the first good lambda_raw


@pytest.mark.parametrize("kind", ["weighted", "align", "vaccine", "lisa"])
def test_max_consecutive_skips_raises_before_any_change(kind):
    r = _Runner(kind, max_consecutive_skips=2)
    r.step()
    r.step(poisoned=True)
    r.step()  # a good step resets the count
    r.step(poisoned=True)
    r.step(poisoned=True)
    snap = r.snapshot()
    with pytest.raises(NonFiniteError, match="2 consecutive steps were skipped"):
        r.step()
    after = r.snapshot()
    _assert_same(snap[0], after[0], "parameters")
    _assert_same(snap[1], after[1], "optimizer state")


def test_extreme_options_are_skipped_not_written():
    """lr=inf or weight_decay=1e30 turn θ non-finite or huge: those updates are skipped, θ stays finite."""
    model = tiny_model("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    for opt in (
        torch.optim.SGD(params, lr=float("inf")),
        torch.optim.AdamW(params, lr=1e-2, weight_decay=1e30),
    ):
        for i in range(4):
            sft_step(model, make_finetune_batch(3, seed=50 + i).answer_view(), opt)
        assert _all_finite(model)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(max_consecutive_skips=0), "max_consecutive_skips"),
        (dict(max_consecutive_skips=1.5), "max_consecutive_skips"),
        (dict(guard_nonfinite="yes"), "guard_nonfinite"),
    ],
)
def test_guard_options_validated(cfg, match):
    model = tiny_model("llama")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = trainable_params(model)
    with pytest.raises(ValueError, match=match):
        weighted_step(model, make_finetune_batch(3, seed=1), opt, FinetuneConfig(**cfg))
    with pytest.raises(ValueError, match=match):
        align_step(model, make_align_batch(seed=1), opt, AlignState(), AlignConfig(**cfg))
    _assert_same(before, trainable_params(model), "parameters")


# --------------------------------------------------------------------------------------------- stale flat
def _roundtrip(model):
    """A dtype round trip after packing: same Parameter objects, new storage (the flat views go stale)."""
    model.to(torch.float64)
    model.to(torch.float32)
    return model


def _fresh_reference_step(seed_steps, kind="sft", lr=1e-2, roundtrip_after=None):
    """Parameters after running ``seed_steps`` sft steps; the model is round-tripped after step
    ``roundtrip_after`` (None: never)."""
    model = tiny_model("llama")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    norms = []
    for i, s in enumerate(seed_steps):
        st = sft_step(model, make_finetune_batch(3, seed=s).answer_view(), opt)
        norms.append(float(st.grad_norm))
        if roundtrip_after is not None and i == roundtrip_after:
            _roundtrip(model)
    return model, norms


def test_stale_flat_grad_norm_and_zeroing():
    """After model.to(...) round trip: grad norms are the true ones (not 0) and grads do not accumulate across
    steps -- the training equals a run without the round trip."""
    ref, ref_norms = _fresh_reference_step([60, 61, 62])
    got, got_norms = _fresh_reference_step([60, 61, 62], roundtrip_after=0)
    assert got_norms[1] > 0
    assert got_norms == pytest.approx(ref_norms, rel=1e-6)
    _assert_same(trainable_params(ref), trainable_params(got), "parameters after a dtype round trip")


def test_stale_flat_perturbation_still_perturbs():
    model = tiny_model("llama")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    align_step(model, make_align_batch(seed=63), opt, AlignState(), AlignConfig(rho=0.5))
    _roundtrip(model)
    st = align_step(model, make_align_batch(seed=64), opt, AlignState(), AlignConfig(rho=0.5))
    assert float(st.loss_perturbed) != float(st.loss_harmful), "the perturbation did nothing (stale buffers)"


def test_stale_flat_direct_use_raises():
    from antibody_fast.flat import FlatParameters, StaleFlatParametersError

    model = tiny_model("llama")
    flat = FlatParameters(model)
    assert not flat.is_stale()
    _roundtrip(model)
    assert flat.is_stale()
    g = [torch.ones_like(b) for b in flat.grad_buffers]
    with pytest.raises(StaleFlatParametersError, match="no longer live in the flat buffers"):
        with flat.perturbed(g, 0.1):
            pass
    with pytest.raises(StaleFlatParametersError):
        flat.zero_grad()


def test_model_to_float64_after_first_step():
    """model.to(float64) after a step: with a fresh optimizer the step trains in float64; with the old AdamW
    (float32 moments) it raises a clear error before changing anything, instead of crashing mid-update."""
    model = tiny_model("llama")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sft_step(model, make_finetune_batch(3, seed=65).answer_view(), opt)
    model.to(torch.float64)
    before = trainable_params(model)
    with pytest.raises(ValueError, match="model.to"):
        sft_step(model, make_finetune_batch(3, seed=66).answer_view(), opt)
    _assert_same(before, trainable_params(model), "parameters")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    st = sft_step(model, make_finetune_batch(3, seed=66).answer_view(), opt)
    assert not bool(st.skipped) and float(st.grad_norm) > 0
    assert all(p.dtype == torch.float64 for p in model.parameters() if p.requires_grad)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------- optimizer
def test_optimizer_without_trainable_params_raises_before_change():
    model = tiny_model("llama")
    other = tiny_model("llama")
    wrong = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-2)
    before = trainable_params(model)
    for fn in (
        lambda: weighted_step(model, make_finetune_batch(3, seed=67), wrong),
        lambda: sft_step(model, make_finetune_batch(3, seed=67).answer_view(), wrong),
        lambda: align_step(model, make_align_batch(seed=67), wrong, AlignState()),
        lambda: vaccine_step(model, make_finetune_batch(3, seed=67).answer_view(), wrong),
    ):
        with pytest.raises(ValueError, match="holds none of the model's"):
            fn()
    _assert_same(before, trainable_params(model), "parameters")
    assert len(wrong.state) == 0
    # checked once: the guard is cached per optimizer (a good optimizer is not re-checked every step)
    from antibody_fast import guard as guard_mod

    good = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sft_step(model, make_finetune_batch(3, seed=68).answer_view(), good)
    g1 = guard_mod.peek_guard(good)
    sft_step(model, make_finetune_batch(3, seed=69).answer_view(), good)
    assert g1 is not None and guard_mod.peek_guard(good) is g1


# --------------------------------------------------------------------------------------------- refused options
def test_options_that_can_only_give_nonfinite_results_are_refused():
    from antibody_fast import linear_sequence_logprob, sequence_logprob
    from antibody_fast.models import add_lora, tiny_llama

    h, w = torch.randn(2, 3, 8), torch.randn(16, 8)
    labels = torch.randint(0, 16, (2, 3))
    for cap in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="softcap must be a finite positive"):
            linear_sequence_logprob(h, w, labels, softcap=cap)
    # T = 0: a clear message (it used to say "targets must be int64")
    for fn, args in (
        (linear_sequence_logprob, (torch.randn(2, 0, 8), w, torch.zeros(2, 0, dtype=torch.long))),
        (sequence_logprob, (torch.randn(2, 0, 16), torch.zeros(2, 0, dtype=torch.long))),
    ):
        with pytest.raises(ValueError, match="T = 0"):
            fn(*args)
    model = tiny_llama(vocab_size=32)
    for alpha in (float("nan"), float("inf"), 0.0, -2.0):
        with pytest.raises(ValueError, match="LoRA alpha must be a finite number"):
            add_lora(model, r=2, alpha=alpha)
    assert not any(p.requires_grad is False for p in model.parameters())  # the model was not wrapped
    for cfg, match in (
        (dict(eta=float("nan")), "eta"),
        (dict(rho=-1.0), "rho"),
        (dict(rho=float("inf")), "rho"),
        (dict(momentum=1.0), "momentum"),
    ):
        with pytest.raises(ValueError, match=match):
            AlignConfig(**cfg).validate()
    with pytest.raises(ValueError, match="rho"):
        LisaConfig(rho=float("inf")).validate()


def test_guard_backups_do_not_grow_across_optimizer_reloads():
    from antibody_fast import guard as guard_mod

    model = tiny_model("llama")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(3):
        sft_step(model, make_finetune_batch(3, seed=80 + i).answer_view(), opt)
        opt.load_state_dict(opt.state_dict())  # replaces every per-parameter state dict
    g = guard_mod.peek_guard(opt)
    n_state = sum(len(s) for s in opt.state.values())
    assert len(g._state_backup) == n_state


class _FailingAdamW(torch.optim.AdamW):
    fail = False

    def step(self, closure=None):
        if self.fail:
            raise RuntimeError("optimizer step failed")
        return super().step(closure)


def test_failing_optimizer_step_leaves_align_state_unchanged():
    """An exception from ``optimizer.step`` inside ``align_step``: ``AlignState`` (step count and λ EMA) is
    not advanced, and the next step runs as if the failed one never happened."""
    model = tiny_model("llama")
    opt = _FailingAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state, cfg = AlignState(), AlignConfig()
    align_step(model, make_align_batch(seed=1), opt, state, cfg)
    assert state.step == 1 and state.lambda_ema is not None
    step, ema = state.step, state.lambda_ema.clone()
    opt.fail = True
    with pytest.raises(RuntimeError, match="optimizer step failed"):
        align_step(model, make_align_batch(seed=2), opt, state, cfg)
    assert state.step == step, "the failed step advanced AlignState.step"
    assert torch.equal(state.lambda_ema, ema), "the failed step changed the lambda EMA"
    opt.fail = False
    st = align_step(model, make_align_batch(seed=3), opt, state, cfg)
    assert state.step == step + 1 and not bool(st.skipped)
