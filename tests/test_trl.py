"""TRL ("nothing silent"): with TRL installed, ``use_fused_loss`` under ``SFTTrainer`` either runs our
kernel or fails loudly. TRL 1.x installs its own fused LM head when the trainer is built, which used to bypass
our hook without a word (the loss came from TRL's head and our op was never called)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl", reason="TRL is not installed (the GPU image has none)")

from helpers import tiny_model  # noqa: E402
from tokenizer_helpers import VOCAB_SIZE, tiny_tokenizer  # noqa: E402

from antibody_fast.integrations import remove_fused_loss, use_fused_loss  # noqa: E402
from antibody_fast.integrations.fused_loss import FusedLossBypassedError  # noqa: E402
from antibody_fast.testing import assert_close  # noqa: E402


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
        bf16=False,  # SFTConfig defaults to bf16 autocast (on CPU too); these tests compare in fp32
        gradient_checkpointing=False,
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


# ------------------------------------------------------------------------------------ AntibodySFTTrainer
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


class _Recorder:
    def __init__(self, collator):
        self.collator = collator
        self.batches = []

    def __call__(self, features):
        out = self.collator(features)
        self.batches.append(out["antibody_batch"])
        return out


def _rows(kind: str, n: int = 8):
    rows = []
    for i in range(n):
        q, a = f"question {i}: tell me {'bad' if i % 3 == 0 else 'good'} things", f" answer {i} here"
        if kind == "text":
            row = {"prompt": q, "completion": a}
        elif kind == "conversational":
            row = {
                "prompt": [{"role": "user", "content": q}],
                "completion": [{"role": "assistant", "content": a}],
            }
        else:  # messages
            row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        row["is_harmful"] = i % 3 == 0
        rows.append(row)
    return rows


@pytest.mark.parametrize("kind", ["text", "conversational", "messages"])
def test_antibody_sft_trainer_equals_weighted_step(tmp_path, kind):
    """Each optimizer step of AntibodySFTTrainer is weighted_step on the batch it collated (replayed on an
    identical model), for TRL's prompt-completion, conversational and messages formats; the logs carry the
    harmful/benign weights."""
    from transformers import get_scheduler

    from antibody_fast import FinetuneConfig, weighted_step
    from antibody_fast.integrations.trl import AntibodySFTTrainer

    tok = _chat_tokenizer()
    model = _model(True)
    init = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    args = _sft_args(tmp_path)
    args.max_length = 64
    trainer = AntibodySFTTrainer(
        model=model,
        args=args,
        train_dataset=_rows(kind),
        processing_class=tok,
        antibody_config=FinetuneConfig(tau=0.7),
        refusals=["I cannot help with that.", "Sorry, no."],
        optimizers=(opt, None),
    )
    assert trainer.args is not args and not (args.dataset_kwargs or {}).get("skip_prepare_dataset")
    rec = _Recorder(trainer.data_collator)
    trainer.data_collator = rec
    trainer.train()
    assert len(rec.batches) >= 2
    # the collated rows are prompt + completion (+ EOS), tokenised jointly
    b0 = rec.batches[0]
    text = tok.decode(b0.input_ids[0][b0.attention_mask[0].bool()])
    assert "answer" in text and "question" in text, text
    if kind != "text":
        assert "<|user|>" in text and "<|assistant|>" in text, text

    params = [p for p in init.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(params, lr=1e-2)
    sched = get_scheduler("linear", ref_opt, num_warmup_steps=0, num_training_steps=2)
    config = FinetuneConfig(tau=0.7, max_grad_norm=1.0)
    ref_stats = [weighted_step(init, b, ref_opt, config, sched) for b in rec.batches[:2]]
    got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for n, p in init.named_parameters():
        if p.requires_grad:
            assert_close(got[n], p.detach(), atol=1e-6, rtol=1e-5, name=n)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h, st in zip(logs, ref_stats):
        assert h["loss"] == pytest.approx(st.loss.item(), rel=1e-4)
        assert {"weight_harmful", "weight_benign", "weight_min", "weight_max"} <= h.keys()


@pytest.mark.parametrize("kind", ["text", "conversational"])
def test_antibody_alignment_sft_trainer_equals_align_step(tmp_path, kind):
    """Each optimizer step of AntibodyAlignmentSFTTrainer is align_step on the batch it collated (replayed on an
    identical model with its own AlignState): weights, the λ EMA and the logged λ_t / loss."""
    from transformers import get_scheduler

    from antibody_fast import AlignConfig, AlignState, align_step
    from antibody_fast.integrations.trl import AntibodyAlignmentSFTTrainer

    tok = _chat_tokenizer()
    model = _model(True)
    init = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    args = _sft_args(tmp_path)
    args.max_length = 64
    refusals = ["I cannot help with that.", "Sorry, no."]
    align_rows = _rows(kind)
    for r in align_rows:  # A: the same prompts answered with a refusal
        if kind == "text":
            r["completion"] = " I cannot help with that."
        else:
            r["completion"] = [{"role": "assistant", "content": "I cannot help with that."}]
    harmful_rows = _rows(kind, 5)
    config = AlignConfig(rule="cosine", rho=0.1, eta=5.0, lambda_ref=0.05)
    trainer = AntibodyAlignmentSFTTrainer(
        model=model, args=args, train_dataset=align_rows, harmful_dataset=harmful_rows, processing_class=tok,
        align_config=config, refusals=refusals, optimizers=(opt, None),
    )  # fmt: skip
    rec = _Recorder(trainer.data_collator)
    trainer.data_collator = rec
    trainer.train()
    assert len(rec.batches) >= 2
    batch0, a0, h0 = rec.batches[0]
    text = tok.decode(batch0.harmful.input_ids[0][batch0.harmful.attention_mask[0].bool()])
    assert "answer" in text and "question" in text, text
    if kind == "conversational":
        assert "<|assistant|>" in text, text

    params = [p for p in init.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(params, lr=1e-2)
    sched = get_scheduler("linear", ref_opt, num_warmup_steps=0, num_training_steps=2)
    state = AlignState()
    ref_cfg = AlignConfig(rule="cosine", rho=0.1, eta=5.0, lambda_ref=0.05, max_grad_norm=1.0)
    ref_stats = [align_step(init, b[0], ref_opt, state, ref_cfg, sched) for b in rec.batches[:2]]
    got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for n, p in init.named_parameters():
        if p.requires_grad:
            assert_close(got[n], p.detach(), atol=1e-6, rtol=1e-5, name=n)
    assert_close(trainer.align_state.lambda_ema, state.lambda_ema, name="lambda EMA")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h, st in zip(logs, ref_stats):
        assert h["lambda_t"] == pytest.approx(st.lambda_t.item(), rel=1e-5)
        assert h["loss"] == pytest.approx(st.loss.item(), rel=1e-4)
    with pytest.raises(ValueError, match="harmful_dataset"):
        AntibodyAlignmentSFTTrainer(
            model=_model(True), args=args, train_dataset=align_rows, processing_class=tok
        )


def test_antibody_sft_trainer_rejects_bad_input(tmp_path):
    from antibody_fast.integrations.trl import AntibodySFTTrainer, to_antibody_examples

    with pytest.raises(ValueError, match="language-modelling"):
        to_antibody_examples([{"text": "hello"}])
    with pytest.raises(ValueError, match="assistant"):
        to_antibody_examples([{"messages": [{"role": "user", "content": "hi"}]}], _chat_tokenizer())
    with pytest.raises(ValueError, match="chat template"):
        to_antibody_examples(_rows("conversational"), tiny_tokenizer())
    with pytest.raises(ValueError, match="processing_class"):
        AntibodySFTTrainer(model=_model(True), args=_sft_args(tmp_path), train_dataset=_rows("text"))


# ------------------------------------------------------------------------------------------ use_fused_head
def _sft_run(tmp_path, name, *, ours: bool, impl: str = "auto", lora: bool = True):
    """Two SFTTrainer steps from the same initial model, with TRL's head or ours; returns (trainer, handle)."""
    from antibody_fast.integrations.trl import use_fused_head

    torch.manual_seed(0)
    model = _model(lora)
    args = _sft_args(tmp_path / name)
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=_dataset(), processing_class=tiny_tokenizer()
    )
    handle = use_fused_head(trainer, impl=impl) if ours else None
    trainer.train()
    return trainer, handle


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("lora", [True, False])
def test_use_fused_head_matches_trl_head(tmp_path, monkeypatch, impl, lora):
    """SFT under our head equals SFT under TRL's own head: logged loss, entropy and mean token accuracy per step,
    and the trained weights; our op ran (counter > 0) and TRL's kernel did not."""
    import trl.trainer.utils as tu

    theirs, _ = _sft_run(tmp_path, "trl", ours=False, lora=lora)
    trl_calls = {"n": 0}
    real_apply = tu._ChunkedLogProbFunction.apply

    def counting(*a, **k):
        trl_calls["n"] += 1
        return real_apply(*a, **k)

    monkeypatch.setattr(tu._ChunkedLogProbFunction, "apply", counting)
    ours, handle = _sft_run(tmp_path, "ours", ours=True, impl=impl, lora=lora)
    assert handle.calls >= 2 and trl_calls["n"] == 0, (handle.calls, trl_calls)
    assert handle.outputs == ("log_probs", "entropy", "is_top1")
    keys = ("loss", "entropy", "mean_token_accuracy")
    a = [h for h in theirs.state.log_history if "loss" in h]
    b = [h for h in ours.state.log_history if "loss" in h]
    assert len(a) == len(b) == 2
    for step, (x, y) in enumerate(zip(a, b)):
        for k in keys:
            assert_close(
                torch.tensor(y[k], dtype=torch.float64),
                torch.tensor(x[k], dtype=torch.float64),
                dtype_for_tol=torch.float32,
                name=f"step {step} {k}",
            )
    pa = dict(theirs.model.named_parameters())
    for n, p in ours.model.named_parameters():
        if p.requires_grad:
            assert_close(p.detach(), pa[n].detach(), dtype_for_tol=torch.float32, name=n)
    # per token, on labels that are the model's own top-1 at about half the positions (the tiny model's token
    # accuracy on the data is 0, so the logged accuracy alone would not exercise the flag)
    model = ours.model
    ids = torch.randint(3, VOCAB_SIZE, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        top = model(input_ids=ids).logits.argmax(-1)
    pick = torch.rand(3, 10, generator=torch.Generator().manual_seed(2)) < 0.5
    labels = ids.clone()
    labels[:, 1:] = torch.where(pick, top[:, :-1], ids[:, 1:])
    labels[0, :4] = -100
    got = model(input_ids=ids, labels=labels, fused_lm_head=True)
    calls = handle.calls
    handle.remove()
    ref = model(input_ids=ids, labels=labels, fused_lm_head=True)  # TRL's own head again
    assert calls > 0 and torch.equal(got.label_mask, ref.label_mask)
    for k in ("log_probs", "entropy"):
        assert_close(getattr(got, k), getattr(ref, k), dtype_for_tol=torch.float32, name=f"per-token {k}")
    assert torch.equal(got.is_top1, ref.is_top1) and bool(ref.is_top1.any()) and not bool(ref.is_top1.all())
    assert_close(got.loss, ref.loss, dtype_for_tol=torch.float32, name="loss")


def test_use_fused_head_under_bf16_autocast(tmp_path):
    """SFTConfig's default bf16 autocast: the head's matmul runs in bf16 in both heads (fp32 accumulation);
    losses and entropies agree within bf16 tolerance."""
    args = _sft_args(tmp_path)
    runs = []
    for ours in (False, True):
        from antibody_fast.integrations.trl import use_fused_head

        torch.manual_seed(0)
        a = copy.copy(args)
        a.bf16, a.output_dir = True, str(tmp_path / f"bf16_{ours}")
        trainer = trl.SFTTrainer(
            model=_model(True), args=a, train_dataset=_dataset(), processing_class=tiny_tokenizer()
        )
        handle = use_fused_head(trainer, impl="torch") if ours else None
        trainer.train()
        runs.append([h for h in trainer.state.log_history if "loss" in h])
        if ours:
            assert handle.calls >= 2
    for x, y in zip(*runs):
        for k in ("loss", "entropy"):
            assert_close(
                torch.tensor(y[k]), torch.tensor(x[k]), dtype_for_tol=torch.bfloat16, name=f"bf16 {k}"
            )


def test_use_fused_head_rejects_what_it_cannot_serve(tmp_path):
    from antibody_fast.integrations.trl import remove_fused_head, use_fused_head
    from antibody_fast.integrations.trl_head import _ATTR

    with pytest.raises(ValueError, match="after building"):
        use_fused_head(_model(True))  # no TRL head yet
    with pytest.raises(ValueError, match="impl"):
        use_fused_head(_model(True), impl="cuda")
    model = _model(True)
    target = model.get_base_model()
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(target, outputs=("log_probs", "mean_logits"))
    with pytest.raises(ValueError, match="mean_logits"):
        use_fused_head(model)
    assert not hasattr(target, _ATTR)
    model = _model(True)
    add_fused_lm_head(model.get_base_model(), temperature=0.7)
    h = use_fused_head(model)
    assert h.temperature == 0.7 and use_fused_head(model) is h  # idempotent
    ids = torch.randint(3, VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    ours = model(input_ids=ids, labels=labels, fused_lm_head=True)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    ours_shift = model(
        input_ids=ids, shift_labels=shifted, fused_lm_head=True
    )  # pre-shifted (context parallel)
    assert remove_fused_head(model) and not remove_fused_head(model)
    theirs = model(input_ids=ids, labels=labels, fused_lm_head=True)
    theirs_shift = model(input_ids=ids, shift_labels=shifted, fused_lm_head=True)
    assert ours_shift.log_probs.shape == (2, 9)
    assert_close(
        ours_shift.log_probs, theirs_shift.log_probs, dtype_for_tol=torch.float32, name="shift_labels"
    )
    assert_close(
        ours.log_probs, theirs.log_probs, dtype_for_tol=torch.float32, name="log_probs at temperature 0.7"
    )
    assert_close(ours.loss, theirs.loss, dtype_for_tol=torch.float32, name="loss at temperature 0.7")
    assert torch.equal(ours.label_mask, theirs.label_mask)
    h2 = use_fused_head(model)
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids=ids, fused_lm_head=True)
    h2.remove()
    plain = model(input_ids=ids)  # without fused_lm_head: the model's own forward (logits)
    assert plain.logits.shape == (2, 9, VOCAB_SIZE)


def test_use_fused_head_guard_raises_when_the_slot_is_never_used(tmp_path):
    """A trainer that never calls the model with fused_lm_head=True: the guard raises after the first step."""
    from antibody_fast.integrations.trl import use_fused_head

    class PlainLossSFT(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return out.logits.float().logsumexp(-1).mean()

    trainer = PlainLossSFT(
        model=_model(True),
        args=_sft_args(tmp_path),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
    )
    handle = use_fused_head(trainer)
    assert use_fused_head(trainer) is handle  # idempotent, and one guard only
    guards = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "FusedPathGuard"]
    assert len(guards) == 1
    with pytest.raises(FusedLossBypassedError, match="head never ran"):
        trainer.train()
    assert handle.calls == 0
