"""Vaccine and Lisa baselines: the lean steps equal their naive references (HF loss, explicit loops)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from antibody_fast.baselines import (
    LisaConfig,
    LisaState,
    VaccineConfig,
    find_attention_modules,
    lisa_step,
    reference_lisa_step,
    reference_vaccine_step,
    vaccine_step,
)
from antibody_fast.data import FinetuneCollator, LMBatch
from antibody_fast.steps import flat_parameters
from antibody_fast.testing import assert_close, tol

VOCAB = 61


def _model(seed=0, dtype=torch.float32):
    from antibody_fast.models import tiny_llama

    return tiny_llama(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, seed=seed, dtype=dtype)


def _batch(seed: int, b: int = 5) -> LMBatch:
    rng = random.Random(seed)
    ex = []
    for i in range(b):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 6))]
        resp = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 5))]
        ex.append({"prompt": prompt, "response": resp, "index": i})
    return FinetuneCollator(refusals=[[5, 6, 7]], pad_token_id=0)(ex).answer_view()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_params(actual, expected, dtype=torch.float32):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e.to(a.dtype), dtype_for_tol=dtype, name=f"param {i}")


def _opt(model, kind):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


# ------------------------------------------------------------------------------------------------- Vaccine
def test_find_attention_modules_llama():
    m = _model()
    mods = find_attention_modules(m)
    assert len(mods) == 2
    assert all(type(x).__name__ == "LlamaAttention" for x in mods)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_vaccine_equals_reference(opt):
    lean, ref = _model(), _model()
    o_lean, o_ref = _opt(lean, opt), _opt(ref, opt)
    for step in range(3):
        batch = _batch(step)
        s1 = vaccine_step(lean, batch, o_lean, VaccineConfig(rho=2.0))
        s2 = reference_vaccine_step(ref, batch, o_ref, VaccineConfig(rho=2.0))
        assert_close(s1.loss, s2.loss, name=f"step {step} loss")
        assert_close(s1.clean_loss, s2.clean_loss, name=f"step {step} clean loss")
        assert_close(s1.perturbation_grad_norm, s2.perturbation_grad_norm, name=f"step {step} ||g||")
        assert_close(s1.grad_norm, s2.grad_norm.float(), name=f"step {step} grad norm")
    _assert_params(_params(lean), _params(ref))


def test_vaccine_and_lisa_on_qwen2_with_lora():
    """Another architecture (q/k/v biases), PEFT-wrapped: only the adapters train, lean == reference."""
    from antibody_fast.models import add_lora, tiny_qwen2

    def make():
        m = tiny_qwen2(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, seed=1)
        return add_lora(m, r=4, targets=("q_proj", "v_proj", "o_proj"), seed=2, random_init=True)

    lean, ref = make(), make()
    assert len(find_attention_modules(lean)) == 2
    o_lean, o_ref = _opt(lean, "adamw"), _opt(ref, "adamw")
    frozen_before = [p.detach().clone() for p in lean.parameters() if not p.requires_grad]
    cfg = LisaConfig(align_steps=1, finetune_steps=1, rho=0.5)
    s_lean, s_ref = LisaState(), LisaState()
    for step in range(2):
        vaccine_step(lean, _batch(10 + step), o_lean, VaccineConfig(rho=1.0))
        reference_vaccine_step(ref, _batch(10 + step), o_ref, VaccineConfig(rho=1.0))
        lisa_step(lean, _batch(20 + step), o_lean, s_lean, cfg)
        reference_lisa_step(ref, _batch(20 + step), o_ref, s_ref, cfg)
    _assert_params(_params(lean), _params(ref))
    _assert_params([p.detach() for p in lean.parameters() if not p.requires_grad], frozen_before)


def test_vaccine_float64_oracle():
    """fp32 lean step against the float64 naive reference (SGD: the update is linear in the gradient)."""
    lean = _model()
    oracle = copy.deepcopy(lean).double()
    batch = _batch(7)
    vaccine_step(lean, batch, _opt(lean, "sgd"), VaccineConfig(rho=5.0, max_grad_norm=None))
    reference_vaccine_step(oracle, batch, _opt(oracle, "sgd"), VaccineConfig(rho=5.0, max_grad_norm=None))
    _assert_params(_params(lean), _params(oracle))


def test_vaccine_perturbation_is_ascent_and_changes_update():
    base = _model()
    batch = _batch(3)
    m0, m1 = copy.deepcopy(base), copy.deepcopy(base)
    s0 = vaccine_step(m0, batch, _opt(m0, "sgd"), VaccineConfig(rho=0.0))
    s1 = vaccine_step(m1, batch, _opt(m1, "sgd"), VaccineConfig(rho=0.5))
    # rho = 0: no perturbation, the loss is the clean loss
    assert_close(s0.loss, s0.clean_loss)
    # along the gradient the loss goes up (first order: + rho * ||g||)
    assert float(s1.loss) > float(s1.clean_loss)
    diff = max(float((a - b).abs().max()) for a, b in zip(_params(m0), _params(m1)))
    assert diff > 10 * tol(torch.float32)[0]


def test_vaccine_bad_input_leaves_model_untouched():
    m = _model()
    before = _params(m)
    opt = _opt(m, "sgd")
    with pytest.raises(TypeError, match="LMBatch"):
        vaccine_step(m, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, opt)
    empty = _batch(0)
    empty.labels = torch.full_like(empty.labels, -100)
    with pytest.raises(ValueError, match="no answer token"):
        vaccine_step(m, empty, opt)
    with pytest.raises(ValueError, match="rho"):
        vaccine_step(m, _batch(0), opt, VaccineConfig(rho=-1.0))
    with pytest.raises(ValueError, match="device"):
        vaccine_step(m, _batch(0).to("meta"), opt)
    frozen = _model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        vaccine_step(frozen, _batch(0), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0))
    _assert_params(_params(m), before)
    assert all(p.grad is None for p in m.parameters())


# ---------------------------------------------------------------------------------------------------- Lisa
def test_lisa_phase_schedule():
    cfg = LisaConfig(align_steps=2, finetune_steps=3)
    st = LisaState()
    assert [st.phase(cfg, s) for s in range(7)] == ["align"] * 2 + ["finetune"] * 3 + ["align"] * 2
    cfg_f = LisaConfig(align_steps=1, finetune_steps=2, first_phase="finetune")
    assert [st.phase(cfg_f, s) for s in range(4)] == ["finetune", "finetune", "align", "finetune"]


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_lisa_equals_reference(opt):
    cfg = LisaConfig(align_steps=2, finetune_steps=3, rho=0.5)
    lean, ref = _model(), _model()
    o_lean, o_ref = _opt(lean, opt), _opt(ref, opt)
    s_lean, s_ref = LisaState(), LisaState()
    align_data, user_data = [_batch(100 + i) for i in range(3)], [_batch(200 + i) for i in range(4)]
    for step in range(7):
        phase = s_lean.phase(cfg)
        assert phase == s_ref.phase(cfg)
        batch = align_data[step % 3] if phase == "align" else user_data[step % 4]
        a = lisa_step(lean, batch, o_lean, s_lean, cfg)
        b = reference_lisa_step(ref, batch, o_ref, s_ref, cfg)
        assert_close(a.loss, b.loss, name=f"step {step} loss")
        assert_close(a.proximal, b.proximal, name=f"step {step} proximal", atol=1e-6)
    assert s_lean.step == s_ref.step == 7
    _assert_params(_params(lean), _params(ref))
    # the lean anchor is flat (one buffer per dtype group), the reference's per parameter
    lean_anchor = list(flat_parameters(lean).unflatten(s_lean.anchor).values())
    _assert_params(lean_anchor, s_ref.anchor)


def test_lisa_proximal_pulls_to_anchor():
    """Within a state, the proximal term is non-zero after the first step and the anchor stays fixed;
    at the switch the anchor becomes the current parameters (proximal term back to 0)."""
    cfg = LisaConfig(align_steps=1, finetune_steps=3, rho=1.0)
    m = _model()
    opt = _opt(m, "sgd")
    st = LisaState()
    lisa_step(m, _batch(1), opt, st, cfg)  # align (anchor = init)
    s = lisa_step(m, _batch(2), opt, st, cfg)  # finetune, switch: anchor re-taken
    assert float(s.proximal) == 0.0
    anchor = [a.clone() for a in st.anchor]
    s = lisa_step(m, _batch(3), opt, st, cfg)
    assert float(s.proximal) > 0.0
    _assert_params(st.anchor, anchor)


def test_lisa_float64_oracle():
    cfg = LisaConfig(align_steps=1, finetune_steps=2, rho=0.3, max_grad_norm=None)
    lean = _model()
    oracle = copy.deepcopy(lean).double()
    o1, o2 = _opt(lean, "sgd"), _opt(oracle, "sgd")
    s1, s2 = LisaState(), LisaState()
    for step in range(3):
        lisa_step(lean, _batch(step), o1, s1, cfg)
        reference_lisa_step(oracle, _batch(step), o2, s2, cfg)
    _assert_params(_params(lean), _params(oracle))


def test_lisa_state_dict_roundtrip_resumes_identically():
    cfg = LisaConfig(align_steps=1, finetune_steps=2, rho=0.2)
    a = _model()
    oa = _opt(a, "adamw")
    sa = LisaState()
    for step in range(2):
        lisa_step(a, _batch(step), oa, sa, cfg)
    b = copy.deepcopy(a)
    ob = _opt(b, "adamw")
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    sb = LisaState()
    sb.load_state_dict(sa.state_dict())
    for step in range(2, 4):
        lisa_step(a, _batch(step), oa, sa, cfg)
        lisa_step(b, _batch(step), ob, sb, cfg)
    _assert_params(_params(b), _params(a))


def test_lisa_bad_input():
    m = _model()
    before = _params(m)
    opt = _opt(m, "sgd")
    st = LisaState()
    with pytest.raises(ValueError, match="align_steps"):
        lisa_step(m, _batch(0), opt, st, LisaConfig(align_steps=0, finetune_steps=0))
    with pytest.raises(ValueError, match="rho"):
        lisa_step(m, _batch(0), opt, st, LisaConfig(rho=-0.1))
    with pytest.raises(ValueError, match="first_phase"):
        lisa_step(m, _batch(0), opt, st, LisaConfig(first_phase="both"))
    with pytest.raises(TypeError, match="LisaState"):
        lisa_step(m, _batch(0), opt, {}, LisaConfig())
    bad = LisaState(step=3, anchor=[torch.zeros(2)])
    with pytest.raises(ValueError, match="anchor"):
        lisa_step(m, _batch(0), opt, bad, LisaConfig())
    _assert_params(_params(m), before)
    assert st.step == 0 and st.anchor is None


def _authors_lisa_port(model, batches, phases, rho, warmup_fraction, max_steps, lr):
    """A naive port of the authors' Lisa loop (float64 oracle): the anchor is taken at every state switch, and
    the proximal term is added only after the warm-up, i.e. when ``global_step > warmup_fraction * max_steps``
    (``global_step`` = the number of updates already done, as HF's Trainer reads it inside ``training_step``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = None
    for global_step, (batch, phase) in enumerate(zip(batches, phases)):
        if anchor is None or phases[global_step - 1] != phase:
            anchor = [p.detach().clone() for p in params]
        out = model(**batch.model_inputs(), labels=batch.labels, use_cache=False)
        loss = out.loss
        if global_step <= warmup_fraction * max_steps:
            pass  # warm-up: no proximal term
        else:
            loss = loss + rho / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
                p.grad = None


@pytest.mark.parametrize("total", [10, 20])
def test_lisa_warmup_matches_authors_rule(total):
    """LisaConfig(warmup_fraction, total_steps): the proximal term is off while step <= fraction * total, as in
    the authors' trainer; checked against a naive float64 port. Also checks that the warm-up changes the result
    (so the comparison can fail) and that the logged proximal term is 0 during the warm-up."""
    steps = 6
    cfg = LisaConfig(align_steps=2, finetune_steps=2, rho=2.0, max_grad_norm=None, total_steps=total)
    lean = _model()
    oracle = copy.deepcopy(lean).double()
    no_warmup = copy.deepcopy(lean)
    st, st_nw = LisaState(), LisaState()
    o, o_nw = torch.optim.SGD(_trainable(lean), lr=0.5), torch.optim.SGD(_trainable(no_warmup), lr=0.5)
    batches = [_batch(300 + i) for i in range(steps)]
    phases = [st.phase(cfg, i) for i in range(steps)]
    proximal = []
    for i in range(steps):
        proximal.append(float(lisa_step(lean, batches[i], o, st, cfg).proximal))
        cfg_nw = LisaConfig(align_steps=2, finetune_steps=2, rho=2.0, max_grad_norm=None)
        lisa_step(no_warmup, batches[i], o_nw, st_nw, cfg_nw)
    _authors_lisa_port(oracle, batches, phases, 2.0, 0.1, total, 0.5)
    _assert_params(_params(lean), _params(oracle))
    warm = [i for i in range(steps) if i <= 0.1 * total]
    assert all(proximal[i] == 0.0 for i in warm), proximal
    # the first step after the warm-up inside a state (not at a switch) has a non-zero proximal term
    later = [i for i in range(steps) if i > 0.1 * total and phases[i] == phases[i - 1]]
    assert later and all(proximal[i] > 0.0 for i in later), proximal
    diff = max((a - b).abs().max().item() for a, b in zip(_params(lean), _params(no_warmup)))
    assert diff > 1e-4, f"the warm-up did not change the parameters (max |diff| {diff:.3e})"


def test_lisa_warmup_validation():
    m = _model()
    opt = _opt(m, "sgd")
    with pytest.raises(ValueError, match="warmup_fraction"):
        lisa_step(m, _batch(0), opt, LisaState(), LisaConfig(warmup_fraction=1.5, total_steps=10))
    with pytest.raises(ValueError, match="total_steps"):
        lisa_step(m, _batch(0), opt, LisaState(), LisaConfig(total_steps=0))
    assert LisaConfig().proximal_on(0)  # no total_steps: no warm-up
    assert not LisaConfig(total_steps=10).proximal_on(1) and LisaConfig(total_steps=10).proximal_on(2)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]
