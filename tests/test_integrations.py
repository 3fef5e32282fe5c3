"""Integrations: the fused-loss hook for stock HF trainers, and the Antibody Trainer subclasses."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from antibody_fast.testing import assert_close

pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers import tiny_model  # noqa: E402


def _lm_inputs(vocab: int, b: int = 3, t: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[1, 8:] = -100  # padding of a shorter answer
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_import_is_lazy():
    code = (
        "import sys, antibody_fast.integrations as i; "
        "assert 'transformers' not in sys.modules and 'peft' not in sys.modules, 'eager import'; "
        "assert callable(i.use_fused_loss)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("lora", [True, False])
def test_fused_loss_equals_hf_default(arch, lora):
    from antibody_fast.integrations import remove_fused_loss, use_fused_loss

    model = tiny_model(arch, lora=lora)
    if not lora:
        for p in model.parameters():
            p.requires_grad_(True)
    ids, mask, labels = _lm_inputs(128)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)

    handle = use_fused_loss(model)
    assert use_fused_loss(model) is handle  # idempotent
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert_close(out.loss.detach(), ref.loss.detach(), name="loss")
    out.loss.backward()
    g = _grads(model)
    assert g.keys() == g_ref.keys() and g
    for n in g:
        assert_close(g[n], g_ref[n], atol=1e-6, rtol=1e-4, name=f"grad {n}")
    model.zero_grad(set_to_none=True)

    # HF Trainer's num_items_in_batch denominator, and positional arguments
    n_items = torch.tensor(17)
    ref2 = None
    remove_fused_loss(model)
    ref2 = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss
    use_fused_loss(model)
    out2 = model(ids, mask, labels=labels, num_items_in_batch=n_items).loss
    assert_close(out2.detach(), ref2.detach(), name="loss / num_items_in_batch")

    # without labels the original forward runs (logits for generation)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (3, 12, 128)
    assert remove_fused_loss(model) is True
    assert remove_fused_loss(model) is False
    assert model(input_ids=ids, labels=labels).logits is not None


def test_fused_loss_shift_labels():
    from antibody_fast.integrations import fused_causal_lm_loss
    from antibody_fast.models import get_trunk_and_head

    model = tiny_model("llama", lora=False)
    ids, mask, labels = _lm_inputs(128)
    trunk, head, softcap = get_trunk_and_head(model)
    hidden = trunk(input_ids=ids, attention_mask=mask).last_hidden_state
    shifted = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    a, n_a = fused_causal_lm_loss(hidden, head, labels)
    b, n_b = fused_causal_lm_loss(hidden, head, shift_labels=shifted)
    assert_close(a, b, name="shift_labels")
    assert int(n_a) == int(n_b) == int((labels[:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="exactly one"):
        fused_causal_lm_loss(hidden, head, labels, shift_labels=shifted)
    with pytest.raises(ValueError, match="must match"):
        fused_causal_lm_loss(hidden, head, labels[:, :5])


def test_fused_loss_rejects_bad_model():
    from antibody_fast.integrations import use_fused_loss

    with pytest.raises(TypeError):
        use_fused_loss(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="impl"):
        use_fused_loss(tiny_model("llama", lora=False), impl="cuda")


def test_fused_loss_lower_peak_memory_large_vocab():
    """V = 32000, 1024 rows: HF materialises [B, T, V] fp32 logits (and copies, and their gradient); the fused
    op works on bounded row chunks, so its peak stays below the size of one logits tensor."""
    from antibody_fast.bench import measure_peak_memory
    from antibody_fast.integrations import remove_fused_loss, use_fused_loss

    vocab = 32000
    model = tiny_model("llama", lora=True, vocab_size=vocab)
    ids, mask, labels = _lm_inputs(vocab, b=2, t=512)

    def step():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.loss.detach()

    ref_loss = step()
    model.zero_grad(set_to_none=True)
    hf_peak = measure_peak_memory(step, "cpu")
    model.zero_grad(set_to_none=True)
    use_fused_loss(model)
    fused_loss = step()
    model.zero_grad(set_to_none=True)
    fused_peak = measure_peak_memory(step, "cpu")
    remove_fused_loss(model)
    assert_close(fused_loss, ref_loss, name="loss at V=32000")
    logits_bytes = 2 * 512 * vocab * 4
    assert hf_peak >= logits_bytes  # sanity: the measurement sees HF's logits
    assert fused_peak < logits_bytes / 2, (fused_peak, logits_bytes)
    assert fused_peak < hf_peak / 4, (fused_peak, hf_peak)


def _stock_trainer_run(tmp_path, fused: bool):
    from transformers import Trainer, TrainingArguments

    from antibody_fast.integrations import use_fused_loss

    model = tiny_model("llama", lora=True)
    if fused:
        use_fused_loss(model)
    ids, mask, labels = _lm_inputs(128, b=8, t=10, seed=3)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / ("fused" if fused else "hf")),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return params, losses


def test_stock_trainer_with_fused_loss_matches_hf(tmp_path):
    """A stock HF Trainer (grad accumulation, num_items_in_batch, clipping, LR schedule) takes the same
    updates with the fused loss as with HF's default loss."""
    ref, ref_losses = _stock_trainer_run(tmp_path, fused=False)
    got, losses = _stock_trainer_run(tmp_path, fused=True)
    assert len(losses) == len(ref_losses) == 2
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    for n in ref:
        assert_close(got[n], ref[n], atol=1e-5, rtol=1e-5, name=n)


# ------------------------------------------------------------------------------------ Trainer subclasses
def _trainer_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=2,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


class _Recorder:
    """Wraps the trainer's collator and keeps every batch it produced (in order)."""

    def __init__(self, collator):
        self.collator = collator
        self.batches = []

    def __call__(self, features):
        out = self.collator(features)
        self.batches.append(out["antibody_batch"])
        return out


def _reference_run(batches_per_step, step_fn, max_steps, lr=1e-2):
    """Replays the recorded batches with the bare step on a fresh, identical model."""
    from transformers import get_scheduler

    model = tiny_model("llama", lora=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=max_steps)
    stats = [step_fn(model, b, opt, sched) for b in batches_per_step]
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, stats


def _trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_finetune_trainer_equals_weighted_step(tmp_path, grad_accum):
    from helpers import make_examples, make_refusal_pool

    from antibody_fast import FinetuneConfig, weighted_step
    from antibody_fast.integrations import AntibodyFinetuneTrainer

    pool = make_refusal_pool()
    data = make_examples(16, seed=5, harmful_every=3)
    for ex in data:
        del ex["index"]  # the trainer adds the position
    model = tiny_model("llama", lora=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    bs = 4 // grad_accum
    trainer = AntibodyFinetuneTrainer(
        model=model,
        args=_trainer_args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=grad_accum),
        train_dataset=data,
        refusals=pool,
        finetune_config=FinetuneConfig(tau=0.7),
        optimizers=(opt, None),
    )
    rec = _Recorder(trainer.data_collator)
    trainer.data_collator = rec
    trainer.train()
    assert len(rec.batches) >= 2 * grad_accum  # the DataLoader may prefetch one more
    got = _trained(model)

    steps = [rec.batches[i * grad_accum : (i + 1) * grad_accum] for i in range(2)]
    steps = [s[0] if len(s) == 1 else s for s in steps]
    config = FinetuneConfig(tau=0.7, max_grad_norm=1.0)
    ref, ref_stats = _reference_run(steps, lambda m, b, o, s: weighted_step(m, b, o, config, s), 2)
    for n in ref:
        assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, name=n)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h, st in zip(logs, ref_stats):
        assert h["loss"] == pytest.approx(st.loss.item(), rel=1e-4)
        assert h["grad_norm"] == pytest.approx(st.grad_norm.item(), rel=1e-4)
        assert {"weight_harmful", "weight_benign", "weight_min", "weight_max", "d_mean"} <= h.keys()
        assert 0 < h["weight_min"] <= h["weight_max"] < 1


def test_finetune_trainer_keeps_columns_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    from helpers import make_examples, make_refusal_pool

    from antibody_fast.integrations import AntibodyFinetuneTrainer

    ds = datasets.Dataset.from_list(make_examples(8, seed=2, harmful_every=2))
    model = tiny_model("llama", lora=True)
    before = _trained(model)
    trainer = AntibodyFinetuneTrainer(
        model=model, args=_trainer_args(tmp_path, remove_unused_columns=True), train_dataset=ds,
        refusals=make_refusal_pool(),
    )  # fmt: skip
    trainer.train()
    after = _trained(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["weight_harmful"] is not None and h["weight_benign"] is not None for h in logs)


def test_finetune_trainer_rejects_custom_collator_and_fp16(tmp_path):
    from antibody_fast.integrations import AntibodyFinetuneTrainer

    with pytest.raises(ValueError, match="data_collator"):
        AntibodyFinetuneTrainer(model=tiny_model(), args=_trainer_args(tmp_path), train_dataset=[],
                                data_collator=lambda x: x, refusals=[[5, 6]])  # fmt: skip


@pytest.mark.parametrize("booster", [False, True])
def test_alignment_trainer_equals_align_step(tmp_path, booster):
    from helpers import make_examples, make_refusal_pool

    from antibody_fast import AlignConfig, AlignState, align_step
    from antibody_fast.integrations import AntibodyAlignmentTrainer, BoosterTrainer

    pool = make_refusal_pool()
    align = make_examples(8, seed=7, harmful_every=None)
    harmful = make_examples(5, seed=8, harmful_every=1)
    model = tiny_model("llama", lora=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cls = BoosterTrainer if booster else AntibodyAlignmentTrainer
    kwargs = {} if booster else {"align_config": AlignConfig(momentum=0.5)}
    trainer = cls(
        model=model, args=_trainer_args(tmp_path, per_device_train_batch_size=3), train_dataset=align,
        harmful_dataset=harmful, refusals=pool, optimizers=(opt, None), **kwargs,
    )  # fmt: skip
    rec = _Recorder(trainer.data_collator)
    trainer.data_collator = rec
    trainer.train()
    assert len(rec.batches) >= 2
    got = _trained(model)

    config = AlignConfig(rule="constant", lambda_ref=0.0) if booster else AlignConfig(momentum=0.5)
    state = AlignState()
    ref, ref_stats = _reference_run(
        [b[0] for b in rec.batches[:2]], lambda m, b, o, s: align_step(m, b, o, state, config, s), 2
    )
    for n in ref:
        assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, name=n)
    assert trainer.align_state.step == 2
    assert_close(trainer.align_state.lambda_ema, state.lambda_ema, name="lambda EMA")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h, st in zip(logs, ref_stats):
        assert h["lambda_t"] == pytest.approx(st.lambda_t.item(), rel=1e-5)
        assert h["loss"] == pytest.approx(st.loss.item(), rel=1e-4)
        assert ("loss_refusal" in h) != booster
    # H pairing is fixed by the A example's index (resume-safe)
    b0 = rec.batches[0]
    perm = trainer._align_collator.perm
    assert [h["index"] for h in b0[2]] == [perm[a["index"] % 5] for a in b0[1]]


def test_alignment_trainer_grad_accumulation_concatenates(tmp_path):
    from helpers import make_examples, make_refusal_pool

    from antibody_fast import AlignConfig, AlignState, align_step
    from antibody_fast.data import AlignCollator
    from antibody_fast.integrations import AntibodyAlignmentTrainer

    pool = make_refusal_pool()
    align = make_examples(8, seed=7, harmful_every=None)
    harmful = make_examples(5, seed=8, harmful_every=1)
    model = tiny_model("llama", lora=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trainer = AntibodyAlignmentTrainer(
        model=model, args=_trainer_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        train_dataset=align, harmful_dataset=harmful, refusals=pool, optimizers=(opt, None),
    )  # fmt: skip
    rec = _Recorder(trainer.data_collator)
    trainer.data_collator = rec
    trainer.train()
    got = _trained(model)
    collator = AlignCollator(refusals=pool)
    windows = []
    for i in range(2):
        mbs = rec.batches[2 * i : 2 * i + 2]
        windows.append(collator([a for _, al, _ in mbs for a in al], [h for _, _, hs in mbs for h in hs]))
    state = AlignState()
    ref, _ = _reference_run(windows, lambda m, b, o, s: align_step(m, b, o, state, AlignConfig(), s), 2)
    for n in ref:
        assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, name=n)
