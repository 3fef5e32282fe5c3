"""TRL (issue 18, "nothing silent"): with TRL installed, ``use_fused_loss`` under ``SFTTrainer`` either runs our
kernel or fails loudly. TRL 1.x installs its own fused LM head when the trainer is built, which used to bypass
our hook without a word (the loss came from TRL's head and our op was never called)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl", reason="TRL is not installed (the GPU image has none)")

from helpers import tiny_model  # noqa: E402
from tokenizer_helpers import VOCAB_SIZE, tiny_tokenizer  # noqa: E402

from antibody_fast.integrations import remove_fused_loss, use_fused_loss  # noqa: E402
from antibody_fast.integrations.fused_loss import FusedLossBypassedError  # noqa: E402


def _dataset():
    from datasets import Dataset

    rows = [{"prompt": f"Q{i}: say hi.", "completion": f" hi {i}"} for i in range(8)]
    return Dataset.from_list(rows)


def _sft_args(tmp_path):
    return trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
        max_length=32,
        disable_tqdm=True,
    )


def _model(lora: bool):
    model = tiny_model("llama", lora=lora, vocab_size=VOCAB_SIZE)
    if not lora:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def _count_op_calls(monkeypatch):
    """Counts calls of the fused op itself (not of our hook), so the test sees whether our kernel ran."""
    import importlib

    op = importlib.import_module(
        "antibody_fast.ops.sequence_logprob"
    )  # the module (the package re-exports a function)
    calls = {"n": 0}
    real = op.linear_sequence_logprob

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(op, "linear_sequence_logprob", counting)
    return calls


@pytest.mark.parametrize("lora", [True, False])
def test_hook_then_sft_trainer_fails_loudly(tmp_path, monkeypatch, lora):
    """Hook first, trainer second (what the README used to suggest): TRL replaces the forward; the first training
    call raises, before any optimizer step, and our op was never silently skipped."""
    calls = _count_op_calls(monkeypatch)
    model = _model(lora)
    handle = use_fused_loss(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trl.SFTTrainer(
        model=model, args=_sft_args(tmp_path), train_dataset=_dataset(), processing_class=tiny_tokenizer()
    )
    with pytest.raises(FusedLossBypassedError, match="fused_lm_head"):
        trainer.train()
    assert calls["n"] == 0 and handle.calls == 0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed although the step was refused"


def test_sft_trainer_then_hook_refuses_to_install(tmp_path):
    """Trainer first: the model already carries TRL's fused head, so installing ours raises at once."""
    model = _model(True)
    trainer = trl.SFTTrainer(
        model=model, args=_sft_args(tmp_path), train_dataset=_dataset(), processing_class=tiny_tokenizer()
    )
    with pytest.raises(FusedLossBypassedError, match="another fused LM head"):
        use_fused_loss(trainer.model)
    with pytest.raises(FusedLossBypassedError, match="another fused LM head"):
        use_fused_loss(trainer)


def test_without_hook_trl_trains(tmp_path):
    """Control: the same SFTTrainer run without our hook trains (so the failures above are the hook's doing)."""
    model = _model(True)
    trainer = trl.SFTTrainer(
        model=model, args=_sft_args(tmp_path), train_dataset=_dataset(), processing_class=tiny_tokenizer()
    )
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))


def test_plain_trainer_runs_our_kernel_and_guard_passes(tmp_path, monkeypatch):
    """A plain transformers.Trainer with the hook: our op runs (counter > 0) and the guard callback is quiet."""
    from transformers import Trainer, TrainingArguments

    calls = _count_op_calls(monkeypatch)
    model = _model(True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB_SIZE, (8, 12), generator=g)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    handle = use_fused_loss(trainer)
    trainer.train()
    assert handle.calls >= 2 and calls["n"] >= 2, (handle.calls, calls)
    assert remove_fused_loss(model)


def test_guard_raises_when_the_hook_never_runs(tmp_path):
    """The guard callback catches any bypass, not only TRL's: a trainer whose compute_loss never calls the
    patched forward raises after the first optimizer step."""
    from transformers import Trainer, TrainingArguments

    class OwnLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # calls the model without labels (logits path), so the fused path never runs
            out = model(input_ids=inputs["input_ids"])
            return out.logits.float().logsumexp(-1).mean()

    model = _model(True)
    rows = [{"input_ids": torch.arange(3, 15), "labels": torch.arange(3, 15)} for _ in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "own"),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = OwnLossTrainer(model=model, args=args, train_dataset=rows)
    use_fused_loss(trainer)
    with pytest.raises(FusedLossBypassedError, match="never ran"):
        trainer.train()
