"""weighted_step / align_step / sft_step against the naive reference algorithm (antibody_fast.reference).

Tiny randomly initialised models (LoRA-wrapped, non-zero B so every adapter gets a gradient), fp32, CPU.
Parameters after one and after five steps must equal the reference's within 1e-5 relative to each tensor's
scale; per-sample statistics within ``tol(float32)``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import (
    assert_same_state,
    full_state,
    make_align_batch,
    make_finetune_batch,
    tiny_model,
    trainable_params,
)

from antibody_fast.reference import reference_align_step, reference_finetune_step, reference_sft_step
from antibody_fast.steps import (
    AlignConfig,
    AlignState,
    FinetuneConfig,
    StepStats,
    align_step,
    finetune,
    sft_step,
    weighted_step,
)
from antibody_fast.testing import assert_close

REL = 1e-5  # parameters: |ours - ref| <= REL * max|ref| + REL * |ref|


def _opt(model, kind="adamw", lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=lr)


def _assert_params_close(m_ours, m_ref, what=""):
    ours, ref = trainable_params(m_ours), trainable_params(m_ref)
    assert ours.keys() == ref.keys()
    for k in ref:
        scale = float(ref[k].abs().max())
        assert_close(ours[k], ref[k], atol=REL * scale, rtol=REL, name=f"{what}{k}")


def _assert_params_moved(model, before):
    after = trainable_params(model)
    assert any(not torch.equal(after[k], before[k]) for k in before), "the step did not change the parameters"


def _pair(arch, **kw):
    return tiny_model(arch, **kw), tiny_model(arch, **kw)


# --------------------------------------------------------------------------------------------- weighted_step
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_weighted_step_matches_reference_1_and_5_steps(arch):
    m_ours, m_ref = _pair(arch)
    o_ours, o_ref = _opt(m_ours), _opt(m_ref)
    s_ours = torch.optim.lr_scheduler.LambdaLR(o_ours, lambda i: 1.0 / (1 + i))
    s_ref = torch.optim.lr_scheduler.LambdaLR(o_ref, lambda i: 1.0 / (1 + i))
    before = trainable_params(m_ours)
    for step in range(5):
        batch = make_finetune_batch(5, seed=step)
        st = weighted_step(m_ours, batch, o_ours, FinetuneConfig(), scheduler=s_ours)
        ref = reference_finetune_step(m_ref, batch, o_ref, scheduler=s_ref)
        assert isinstance(st, StepStats)
        for key in ("weights", "d", "completion_logprob", "refusal_logprob"):
            assert_close(getattr(st, key), ref[key], name=f"step {step} {key}")
        assert torch.equal(st.num_tokens, ref["num_tokens"])
        assert_close(st.loss, ref["loss"], name=f"step {step} loss")
        assert_close(st.grad_norm, ref["grad_norm"].float(), name=f"step {step} grad_norm")
        # harmful / benign mean weights from the flags
        flags = batch.is_harmful
        assert_close(st.harmful_weight, ref["weights"][flags].mean(), name="harmful_weight")
        assert_close(st.benign_weight, ref["weights"][~flags].mean(), name="benign_weight")
        if step == 0:
            _assert_params_moved(m_ours, before)
            _assert_params_close(m_ours, m_ref, "after 1 step: ")
    _assert_params_close(m_ours, m_ref, "after 5 steps: ")
    assert o_ours.param_groups[0]["lr"] == o_ref.param_groups[0]["lr"]
    # the weights are not uniform (otherwise this would only test SFT)
    assert float(st.weights.max() - st.weights.min()) > 1e-3


def test_weighted_step_qwen2_no_clip_tau():
    m_ours, m_ref = _pair("qwen2")
    o_ours, o_ref = _opt(m_ours), _opt(m_ref)
    cfg = FinetuneConfig(tau=0.5, max_grad_norm=None)
    for step in range(2):
        batch = make_finetune_batch(4, seed=10 + step, harmful_every=None)
        st = weighted_step(m_ours, batch, o_ours, cfg)
        ref = reference_finetune_step(m_ref, batch, o_ref, tau=0.5, max_grad_norm=None)
        assert_close(st.weights, ref["weights"], name="weights")
        assert st.harmful_weight is None and st.benign_weight is None
    _assert_params_close(m_ours, m_ref)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_prefix_cache_scoring_equals_full(arch, monkeypatch):
    calls = []
    real = finetune._crop_to_prompt

    def spy(cache, total, p, tr):
        ok = real(cache, total, p, tr)
        calls.append(ok)
        return ok

    monkeypatch.setattr(finetune, "_crop_to_prompt", spy)
    m_cache, m_full = _pair(arch)
    o_cache, o_full = _opt(m_cache), _opt(m_full)
    for step in range(2):
        batch = make_finetune_batch(4, seed=20 + step)
        a = weighted_step(m_cache, batch, o_cache, FinetuneConfig(refusal_scoring="prefix_cache"))
        n_calls = len(calls)
        b = weighted_step(m_full, batch, o_full, FinetuneConfig(refusal_scoring="full"))
        assert len(calls) == n_calls, "'full' scoring must not touch the cache"
        assert_close(a.refusal_logprob, b.refusal_logprob, name="refusal_logprob")
        assert_close(a.d, b.d, name="d")
        assert_close(a.weights, b.weights, name="weights")
    assert calls and all(calls), "the prefix-cache path was not taken"
    _assert_params_close(m_cache, m_full)


def test_prefix_cache_declines_when_sliding_window_is_reached(monkeypatch):
    """Gemma-2 with a sliding window shorter than the batch: the cache has dropped prompt keys, so the
    refusal is scored with a full forward, and the result still equals the reference."""
    calls = []
    real = finetune._crop_to_prompt
    monkeypatch.setattr(finetune, "_crop_to_prompt", lambda *a: calls.append(real(*a)) or calls[-1])
    m_ours, m_ref = _pair("gemma2", sliding_window=6)
    o_ours, o_ref = _opt(m_ours), _opt(m_ref)
    batch = make_finetune_batch(4, seed=7, prompt_len=(4, 7), answer_len=(3, 6))
    assert batch.input_ids.shape[1] >= 6
    with pytest.warns(RuntimeWarning, match="falls back to a full forward"):
        st = weighted_step(m_ours, batch, o_ours)
    ref = reference_finetune_step(m_ref, batch, o_ref)
    assert calls == [False]
    assert_close(st.refusal_logprob, ref["refusal_logprob"], name="refusal_logprob")
    assert_close(st.weights, ref["weights"], name="weights")
    _assert_params_close(m_ours, m_ref)


def test_prefix_cache_falls_back_under_gradient_checkpointing():
    m_ours, m_ref = _pair("llama")
    m_ours.train()
    enable = getattr(m_ours, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        m_ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    o_ours, o_ref = _opt(m_ours), _opt(m_ref)
    batch = make_finetune_batch(4, seed=3)
    with pytest.warns(RuntimeWarning, match="activation checkpointing"):
        st = weighted_step(m_ours, batch, o_ours)
    ref = reference_finetune_step(m_ref, batch, o_ref)
    assert_close(st.refusal_logprob, ref["refusal_logprob"], name="refusal_logprob")
    _assert_params_close(m_ours, m_ref)


def test_weighted_step_gradient_accumulation_per_micro_batch():
    """Two micro-batches: each has its own softmax; the update uses the mean of the two gradients."""
    b1, b2 = make_finetune_batch(3, seed=31), make_finetune_batch(4, seed=32)
    cfg = FinetuneConfig(max_grad_norm=None)
    m_acc = tiny_model("llama")
    before = trainable_params(m_acc)
    st = weighted_step(m_acc, [b1, b2], _opt(m_acc, "sgd", lr=1.0), cfg)
    assert st.weights.shape == (7,)
    assert_close(st.weights[:3].sum(), torch.tensor(1.0), name="micro-batch 1 weights sum")
    assert_close(st.weights[3:].sum(), torch.tensor(1.0), name="micro-batch 2 weights sum")
    deltas = []
    for b in (b1, b2):
        m = tiny_model("llama")
        weighted_step(m, b, _opt(m, "sgd", lr=1.0), cfg)
        deltas.append({k: v - before[k] for k, v in trainable_params(m).items()})
    after = trainable_params(m_acc)
    for k in before:
        expected = (deltas[0][k] + deltas[1][k]) / 2
        assert_close(after[k] - before[k], expected, atol=REL * float(expected.abs().max()), rtol=REL, name=k)


def test_weighted_step_autocast_bf16_runs_close_to_fp32():
    m_amp, m_ref = _pair("llama")
    batch = make_finetune_batch(4, seed=5)
    st = weighted_step(m_amp, batch, _opt(m_amp), FinetuneConfig(amp_dtype=torch.bfloat16))
    ref = reference_finetune_step(m_ref, batch, _opt(m_ref))
    assert st.loss.dtype == torch.float32 and torch.isfinite(st.loss)
    assert_close(st.loss, ref["loss"], dtype_for_tol=torch.bfloat16, name="bf16 loss")
    assert_close(st.weights, ref["weights"], dtype_for_tol=torch.bfloat16, name="bf16 weights")


@pytest.mark.gpu
def test_steps_on_cuda_fp32_and_bf16_autocast():
    """CUDA: fp32 steps equal the reference; under bf16 autocast the statistics stay within bf16 tolerance."""
    m_ours, m_ref = (m.to("cuda") for m in _pair("llama"))
    o_ours, o_ref = _opt(m_ours), _opt(m_ref)
    state, ref_state = AlignState(), {}
    for step in range(2):
        batch = make_finetune_batch(5, seed=step).to("cuda")
        st = weighted_step(m_ours, batch, o_ours)
        ref = reference_finetune_step(m_ref, batch, o_ref)
        assert_close(st.weights, ref["weights"], name="cuda weights")
        ab = make_align_batch(seed=step).to("cuda")
        st_a = align_step(m_ours, ab, o_ours, state)
        ref_a = reference_align_step(m_ref, ab, o_ref, ref_state)
        assert_close(st_a.lambda_t, ref_a["lambda_t"], name="cuda lambda")
        assert state.lambda_ema.device.type == "cuda"
    _assert_params_close(m_ours, m_ref, "cuda: ")

    m_amp, m_fp32 = (m.to("cuda") for m in _pair("llama"))
    batch = make_finetune_batch(5, seed=9).to("cuda")
    st = weighted_step(m_amp, batch, _opt(m_amp), FinetuneConfig(amp_dtype=torch.bfloat16))
    ref = reference_finetune_step(m_fp32, batch, _opt(m_fp32))
    assert_close(st.weights, ref["weights"], dtype_for_tol=torch.bfloat16, name="bf16 weights")
    assert_close(st.loss, ref["loss"], dtype_for_tol=torch.bfloat16, name="bf16 loss")


# --------------------------------------------------------------------------------------------- sft_step
def test_sft_step_matches_hf_sft():
    m_ours, m_ref = _pair("llama")
    o_ours, o_ref = _opt(m_ours), _opt(m_ref)
    for step in range(3):
        batch = make_finetune_batch(4, seed=40 + step).answer_view()
        st = sft_step(m_ours, batch, o_ours)
        ref = reference_sft_step(m_ref, batch, o_ref)
        assert_close(st.loss, ref["loss"], name="loss")
        assert_close(st.grad_norm, ref["grad_norm"].float(), name="grad_norm")
    _assert_params_close(m_ours, m_ref)


# --------------------------------------------------------------------------------------------- align_step
@pytest.mark.parametrize("rule", ["cosine", "kkt", "constant"])
def test_align_step_matches_reference(rule):
    m_ours, m_ref = _pair("llama")
    o_ours, o_ref = _opt(m_ours), _opt(m_ref)
    state, ref_state = AlignState(), {}
    kw = dict(rule=rule, eta=0.5 if rule == "kkt" else 5.0, rho=0.1, lambda_ref=0.05, momentum=0.5)
    before = trainable_params(m_ours)
    for step in range(5):
        batch = make_align_batch(seed=step)
        st = align_step(m_ours, batch, o_ours, state, AlignConfig(**kw))
        ref = reference_align_step(m_ref, batch, o_ref, ref_state, **kw)
        for ours, theirs in (
            ("lambda_raw", "lambda_raw"),
            ("lambda_t", "lambda_t"),
            ("cos", "cos"),
            ("loss_align", "loss_a"),
            ("loss_harmful", "loss_h"),
            ("loss_perturbed", "loss_p"),
            ("loss_refusal", "loss_r"),
            ("grad_norm", "grad_norm"),
        ):
            assert_close(getattr(st, ours), ref[theirs].float(), name=f"step {step} {ours}")
        assert_close(st.dots[0], ref["dot"], name="dot")
        if step == 0:
            _assert_params_moved(m_ours, before)
            _assert_params_close(m_ours, m_ref, "after 1 step: ")
    assert state.step == ref_state["step"] == 5
    assert_close(state.lambda_ema, ref_state["lambda"], name="lambda EMA")
    _assert_params_close(m_ours, m_ref, "after 5 steps: ")


def test_align_step_gemma2_default_config():
    m_ours, m_ref = _pair("gemma2")
    o_ours, o_ref = _opt(m_ours), _opt(m_ref)
    state, ref_state = AlignState(), {}
    for step in range(2):
        batch = make_align_batch(seed=50 + step)
        align_step(m_ours, batch, o_ours, state)
        reference_align_step(m_ref, batch, o_ref, ref_state)
    assert_close(state.lambda_ema, ref_state["lambda"], name="lambda EMA")
    _assert_params_close(m_ours, m_ref)


def test_booster_special_case():
    """Booster = rule "constant", lambda_ref = 0: g_a + eta (g_h - g_p); the refusal pass is skipped."""
    m_ours, m_ref = _pair("llama")
    o_ours, o_ref = _opt(m_ours), _opt(m_ref)
    state, ref_state = AlignState(), {}
    cfg = AlignConfig(rule="constant", lambda_ref=0.0, eta=2.0)
    for step in range(3):
        batch = make_align_batch(seed=60 + step)
        st = align_step(m_ours, batch, o_ours, state, cfg)
        reference_align_step(m_ref, batch, o_ref, ref_state, rule="constant", lambda_ref=0.0, eta=2.0)
        assert st.loss_refusal is None
        assert_close(st.lambda_t, torch.tensor(2.0), name="booster lambda")
    _assert_params_close(m_ours, m_ref)


def test_align_rule_none_is_safety_sft():
    m_ours, m_ref = _pair("llama")
    o_ours, o_ref = _opt(m_ours), _opt(m_ref)
    for step in range(2):
        batch = make_align_batch(seed=70 + step)
        st = align_step(m_ours, batch, o_ours, AlignState(), AlignConfig(rule="none"))
        ref = reference_sft_step(m_ref, batch.align, o_ref)
        assert st.loss_harmful is None and st.loss_perturbed is None
        assert_close(st.loss, ref["loss"], name="loss")
    _assert_params_close(m_ours, m_ref)


def test_align_step_restores_parameters_bitwise():
    """With a zero learning rate the update is a no-op, so any drift would come from perturb/restore."""
    model = tiny_model("llama")
    before = trainable_params(model)
    opt = _opt(model, "sgd", lr=0.0)
    st = align_step(model, make_align_batch(seed=80), opt, AlignState(), AlignConfig(rho=0.5))
    assert float(st.loss_perturbed) != float(st.loss_harmful)  # the perturbation did something
    after = trainable_params(model)
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_align_state_roundtrip():
    state = AlignState()
    assert state.state_dict() == {"lambda_ema": None, "step": 0}
    state.lambda_ema = torch.tensor(3.25)
    state.step = 7
    other = AlignState()
    other.load_state_dict(state.state_dict())
    assert other.step == 7 and torch.equal(other.lambda_ema, torch.tensor(3.25))
    with pytest.raises(ValueError, match="lambda_ema"):
        other.load_state_dict({"step": 1})


# --------------------------------------------------------------------------------------------- bad input
def _trained():
    """A model + AdamW that already took one step (so the optimizer has state to protect)."""
    model = tiny_model("llama")
    opt = _opt(model)
    weighted_step(model, make_finetune_batch(3, seed=90), opt)
    return model, opt


def _opt_state(opt):
    sd = opt.state_dict()
    return {(i, k): v.clone() for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}


def _replace(batch, **kw):
    return dataclasses.replace(batch, **kw)


def _bad_finetune_batches():
    b = make_finetune_batch(3, seed=91)
    p = b.prompt_len
    zero_answer = b.labels.clone()
    zero_answer[1, p:] = -100
    no_refusal = b.refusal_labels.clone()
    no_refusal[2] = -100
    return {
        "missing refusal": (b.answer_view(), "missing refusal"),
        "empty batch": (
            _replace(
                b,
                **{
                    f.name: getattr(b, f.name)[:0]
                    for f in dataclasses.fields(b)
                    if torch.is_tensor(getattr(b, f.name))
                },
            ),
            "empty batch",
        ),
        "answer truncated to zero tokens": (_replace(b, labels=zero_answer), "zero answer tokens"),
        "no answer columns": (
            _replace(
                b,
                input_ids=b.input_ids[:, :p],
                attention_mask=b.attention_mask[:, :p],
                position_ids=b.position_ids[:, :p],
                labels=b.labels[:, :p],
            ),
            "no answer columns",
        ),
        "empty refusal": (_replace(b, refusal_labels=no_refusal), "empty refusal"),
        "wrong device": (b.to("meta"), "is on meta"),
        "not a batch": ({"input_ids": b.input_ids}, "expected an antibody_fast.data.LMBatch"),
    }


@pytest.mark.parametrize("case", list(_bad_finetune_batches()))
def test_weighted_step_bad_input_changes_nothing(case):
    model, opt = _trained()
    batch, match = _bad_finetune_batches()[case]
    model_before, opt_before = full_state(model), _opt_state(opt)
    with pytest.raises((ValueError, TypeError), match=match):
        weighted_step(model, batch, opt)
    assert_same_state(model_before, full_state(model))
    assert_same_state(opt_before, _opt_state(opt))


def test_bad_config_and_frozen_model_change_nothing():
    model, opt = _trained()
    batch = make_finetune_batch(3, seed=92)
    model_before, opt_before = full_state(model), _opt_state(opt)
    for cfg, match in (
        (FinetuneConfig(tau=0.0), "tau"),
        (FinetuneConfig(refusal_scoring="nope"), "refusal_scoring"),
        (FinetuneConfig(max_grad_norm=-1.0), "max_grad_norm"),
    ):
        with pytest.raises(ValueError, match=match):
            weighted_step(model, batch, opt, cfg)
    for cfg, match in ((AlignConfig(rule="sam"), "rule"), (AlignConfig(momentum=1.0), "momentum")):
        with pytest.raises(ValueError, match=match):
            align_step(model, make_align_batch(seed=93), opt, AlignState(), cfg)
    assert_same_state(model_before, full_state(model))
    assert_same_state(opt_before, _opt_state(opt))

    frozen = tiny_model("llama", lora=False)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen_before = full_state(frozen)
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    for fn, arg in (
        (weighted_step, batch),
        (sft_step, batch.answer_view()),
        (lambda m, b, o: align_step(m, b, o, AlignState()), make_align_batch(seed=94)),
    ):
        with pytest.raises(ValueError, match="no trainable parameters"):
            fn(frozen, arg, dummy)
    assert_same_state(frozen_before, full_state(frozen))


def test_align_and_sft_bad_input_change_nothing():
    model, opt = _trained()
    ab = make_align_batch(seed=95)
    p = ab.harmful.prompt_len
    labels = ab.harmful.labels.clone()
    labels[0, p:] = -100
    bad = dataclasses.replace(ab, harmful=dataclasses.replace(ab.harmful, labels=labels))
    state = AlignState()
    model_before, opt_before = full_state(model), _opt_state(opt)
    with pytest.raises(ValueError, match="zero answer tokens"):
        align_step(model, bad, opt, state)
    with pytest.raises(ValueError, match="is on meta"):
        align_step(model, ab.to("meta"), opt, state)
    with pytest.raises(TypeError, match="AlignBatch"):
        align_step(model, ab.align, opt, state)
    with pytest.raises(ValueError, match="is on meta"):
        sft_step(model, ab.align.to("meta"), opt)
    assert state.step == 0 and state.lambda_ema is None
    assert_same_state(model_before, full_state(model))
    assert_same_state(opt_before, _opt_state(opt))
