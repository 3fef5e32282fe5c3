"""Integrations (issue 6 §1-2): the fused-loss hook for stock HF trainers, and the Antibody Trainer subclasses."""

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
