"""The authors-style reference steps against independent hand-written computations (tiny models, fp32, CPU).

The hand-written versions here work on flat vectors (``torch.autograd.grad`` + ``torch.cat``) and unpadded
single-sample forwards, so they share no code path with ``antibody_fast.reference`` beyond HF's model.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_same_state,
    full_state,
    make_align_batch,
    make_examples,
    make_finetune_batch,
    tiny_model,
    trainable_params,
    unpadded_logprob,
)

from antibody_fast.data import FinetuneCollator
from antibody_fast.reference import (
    hf_loss,
    reference_align_step,
    reference_finetune_step,
    reference_sft_step,
    sequence_logprobs,
)
from antibody_fast.testing import assert_close

LR = 0.5


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in _params(model)])


def _set_flat(model, vec: torch.Tensor) -> None:
    with torch.no_grad():
        off = 0
        for p in _params(model):
            p.copy_(vec[off : off + p.numel()].view_as(p))
            off += p.numel()


def _flat_grad(model, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, _params(model))])


def _clip(v: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    if max_norm is None:
        return v
    return v * torch.clamp(max_norm / (v.norm() + 1e-6), max=1.0)


# ------------------------------------------------------------------------------------------------ fine-tuning


@pytest.mark.parametrize("arch,max_grad_norm", [("llama", None), ("gemma2", 0.05)])
def test_finetune_step_matches_hand_written(arch, max_grad_norm):
    pool = [[5, 6, 7], [8, 9], [10]]
    examples = make_examples(4, seed=5, prompt_len=(1, 5), answer_len=(1, 5))
    batch = FinetuneCollator(refusals=pool)(examples)
    tau = 0.7

    # hand-written: unpadded single-sample forwards, flat vectors
    model = tiny_model(arch)
    theta = _flat(model)
    lp_y = [unpadded_logprob(model, e["prompt"], e["response"]) for e in examples]
    lp_r = [unpadded_logprob(model, e["prompt"], pool[e["index"] % 3]) for e in examples]
    n_y = torch.tensor([len(e["response"]) for e in examples], dtype=torch.float64)
    n_r = torch.tensor([len(pool[e["index"] % 3]) for e in examples], dtype=torch.float64)
    d = torch.stack(lp_y) / n_y - torch.stack(lp_r) / n_r
    w = torch.softmax(d / tau, dim=0)
    total = 0.0
    for e, wi in zip(examples, w.float()):
        ids = torch.tensor([e["prompt"] + e["response"]])
        logits = model(input_ids=ids).logits[0, len(e["prompt"]) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(e["response"])[:, None]).sum()
        total = total + wi * -lp
    loss = total / (w.float() * n_y.float()).sum()
    g = _flat_grad(model, loss)
    expected = theta - LR * _clip(g, max_grad_norm)

    ref_model = tiny_model(arch)
    opt = torch.optim.SGD(_params(ref_model), lr=LR)
    out = reference_finetune_step(ref_model, batch, opt, tau=tau, max_grad_norm=max_grad_norm)
    assert_close(out["d"].double(), d, dtype_for_tol=torch.float32, name="d")
    assert_close(out["weights"].double(), w, dtype_for_tol=torch.float32, name="weights")
    assert_close(out["loss"], loss.detach(), name="loss")
    assert_close(out["grad_norm"], g.norm(), name="grad_norm")
    assert_close(_flat(ref_model), expected, name="params after step")
    assert all(p.grad is None for p in _params(ref_model))


def test_finetune_equal_d_gives_hf_sft_loss_and_update():
    # identical samples -> identical d -> uniform weights -> exactly HF's token-mean SFT loss and update
    ex = make_examples(1, seed=9)[0]
    examples = [dict(ex, index=i) for i in range(3)]
    batch = FinetuneCollator(refusals=[[4, 5]])(examples)
    m1, m2 = tiny_model("llama"), tiny_model("llama")
    out = reference_finetune_step(m1, batch, torch.optim.SGD(_params(m1), lr=LR))
    assert torch.equal(out["d"], out["d"][:1].expand(3))
    assert_close(out["weights"], torch.full((3,), 1 / 3), name="weights")
    sft = reference_sft_step(m2, batch, torch.optim.SGD(_params(m2), lr=LR))
    assert_close(out["loss"], sft["loss"], name="loss vs HF SFT")
    assert_close(_flat(m1), _flat(m2), name="params vs HF SFT step")


def test_finetune_large_tau_is_token_mean_sft():
    batch = make_finetune_batch(4, seed=2)
    m1, m2 = tiny_model("qwen2"), tiny_model("qwen2")
    out = reference_finetune_step(m1, batch, torch.optim.SGD(_params(m1), lr=LR), tau=1e12)
    sft = reference_sft_step(m2, batch, torch.optim.SGD(_params(m2), lr=LR))
    assert_close(out["loss"], sft["loss"], name="loss vs HF SFT")
    assert_close(_flat(m1), _flat(m2), name="params vs HF SFT step")


def test_sft_step_matches_hand_written_and_scheduler():
    batch = make_finetune_batch(3, seed=4)
    model = tiny_model("llama")
    theta = _flat(model)
    lp, n = sequence_logprobs(model, batch)
    loss = -lp.sum() / n.sum()
    g = _flat_grad(model, loss)
    ref = tiny_model("llama")
    opt = torch.optim.SGD(_params(ref), lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    out = reference_sft_step(ref, batch, opt, max_grad_norm=None, scheduler=sched)
    assert_close(out["loss"], loss.detach(), name="loss")
    assert_close(_flat(ref), theta - LR * g, name="params")
    assert opt.param_groups[0]["lr"] == LR * 0.5


# ------------------------------------------------------------------------------------------------ alignment


def _hand_align(model, batch, *, rule, eta, rho, lambda_ref, max_grad_norm, prev_lambda=None, momentum=0.0):
    """docs/design.md §2.2 on flat vectors, perturbing and restoring the model in place. Returns (theta_new, lambda)."""
    theta = _flat(model)
    g_h = _flat_grad(model, hf_loss(model, batch.harmful))
    _set_flat(model, theta - rho * g_h / (g_h.norm() + 1e-7))
    g_p = _flat_grad(model, hf_loss(model, batch.harmful))
    g_r = _flat_grad(model, hf_loss(model, batch.refusal))
    _set_flat(model, theta)
    g_a = _flat_grad(model, hf_loss(model, batch.align))
    g_s = g_h - g_p
    dot = g_a @ g_s
    if rule == "cosine":
        raw = torch.clamp(eta - dot / (g_a.norm() * g_s.norm() + 1e-8), min=0)
    elif rule == "kkt":
        raw = torch.clamp(eta - dot / (g_s @ g_s + 1e-8), min=0)
    else:
        raw = torch.tensor(float(eta))
    lam = raw if prev_lambda is None else momentum * prev_lambda + (1 - momentum) * raw
    delta = g_a + lam * g_s + lambda_ref * g_r
    new = theta - LR * _clip(delta, max_grad_norm)
    _set_flat(model, new)
    return new, lam, raw


@pytest.mark.parametrize(
    "rule,eta,lambda_ref,max_grad_norm",
    [
        ("cosine", 5.0, 0.05, 1.0),
        ("kkt", 0.5, 0.05, 0.02),
        ("constant", 5.0, 0.0, 1.0),  # Booster
        ("cosine", 1.0, 0.3, None),
    ],
)
def test_align_step_matches_hand_written(rule, eta, lambda_ref, max_grad_norm):
    batch = make_align_batch(3, 3, seed=len(rule))
    hand_model = tiny_model("llama")
    expected, lam, raw = _hand_align(
        hand_model, batch, rule=rule, eta=eta, rho=0.1, lambda_ref=lambda_ref, max_grad_norm=max_grad_norm
    )
    model = tiny_model("llama")
    state: dict = {}
    out = reference_align_step(
        model,
        batch,
        torch.optim.SGD(_params(model), lr=LR),
        state,
        rule=rule,
        eta=eta,
        lambda_ref=lambda_ref,
        max_grad_norm=max_grad_norm,
    )
    assert_close(out["lambda_t"], lam.float(), name="lambda_t")
    assert_close(out["lambda_raw"], raw.float(), name="lambda_raw")
    assert_close(_flat(model), expected, name="params after align step")
    assert state["step"] == 1 and torch.equal(state["lambda"], out["lambda_t"])
    assert out["loss_p"] < out["loss_h"]  # theta' moves down the harmful loss
    assert all(p.grad is None for p in _params(model))
    if rule == "cosine":
        assert -1.0 <= float(out["cos"]) <= 1.0


def test_align_ema_and_state():
    batches = [make_align_batch(2, 3, seed=s) for s in (1, 2, 3)]
    hand_model, model = tiny_model("qwen2"), tiny_model("qwen2")
    opt = torch.optim.SGD(_params(model), lr=LR)
    state: dict = {}
    prev = None
    raws = []
    for b in batches:
        expected, prev, raw = _hand_align(
            hand_model,
            b,
            rule="cosine",
            eta=1.0,
            rho=0.1,
            lambda_ref=0.05,
            max_grad_norm=1.0,
            prev_lambda=prev,
            momentum=0.5,
        )
        raws.append(raw)
        out = reference_align_step(model, b, opt, state, rule="cosine", eta=1.0, momentum=0.5)
        assert_close(out["lambda_t"], prev.float(), name="lambda_t (EMA)")
        assert_close(_flat(model), expected, name="params")
    assert state["step"] == 3
    # the EMA really mixes: lambda_3 differs from its raw value
    assert not torch.allclose(prev, raws[-1])
    # momentum 0 disables the EMA
    state0: dict = {"lambda": torch.tensor(123.0), "step": 5}
    m0 = tiny_model("qwen2")
    out = reference_align_step(m0, batches[0], torch.optim.SGD(_params(m0), lr=LR), state0, momentum=0.0)
    assert torch.equal(out["lambda_t"], out["lambda_raw"]) and state0["step"] == 6


class _CheckingSGD(torch.optim.SGD):
    """SGD that records, at step() time, whether the parameters still equal a snapshot."""

    def __init__(self, params, snapshot, **kw):
        super().__init__(params, **kw)
        self.snapshot = snapshot
        self.unchanged_at_step = None

    def step(self, closure=None):
        current = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        self.unchanged_at_step = all(torch.equal(a, b) for a, b in zip(current, self.snapshot))
        return super().step(closure)


def test_align_model_copy_leaves_model_untouched():
    batch = make_align_batch(2, 2, seed=7)
    model = tiny_model("gemma2")
    before = full_state(model)
    trainable_before = trainable_params(model)
    opt = _CheckingSGD(_params(model), [p.detach().clone() for p in _params(model)], lr=0.0)
    reference_align_step(model, batch, opt, {})
    assert opt.unchanged_at_step  # the perturbation lived in the copy only: restore is exact
    assert_same_state(full_state(model), before)  # lr = 0: nothing changed at all
    assert trainable_params(model).keys() == trainable_before.keys()


def test_reference_bad_input():
    batch = make_align_batch(2, 2)
    model = tiny_model("llama")
    before = full_state(model)
    opt = torch.optim.SGD(_params(model), lr=LR)
    with pytest.raises(ValueError, match="rule"):
        reference_align_step(model, batch, opt, {}, rule="nope")
    with pytest.raises(TypeError, match="AlignBatch"):
        reference_align_step(model, batch.align, opt, {})
    with pytest.raises(TypeError, match="FinetuneBatch"):
        reference_finetune_step(model, batch.align, opt)
    with pytest.raises(ValueError, match="tau"):
        reference_finetune_step(model, make_finetune_batch(2), opt, tau=0.0)
    frozen = tiny_model("llama", lora=False)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        reference_sft_step(frozen, batch.align, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR))
    assert_same_state(full_state(model), before)
