"""Adapter continuation (docs/design.md §2.4): ``load_adapter`` keeps training the saved alignment
adapter (its non-zero B), ``merge_adapter`` + ``add_lora`` starts a fresh one (B = 0) on the merged weights."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from helpers import make_examples  # noqa: E402

from antibody_fast.data import FinetuneCollator  # noqa: E402
from antibody_fast.models import (  # noqa: E402
    ADAPTER_METADATA,
    add_lora,
    load_adapter,
    merge_adapter,
    read_adapter_metadata,
    tiny_llama,
    write_adapter_metadata,
)
from antibody_fast.steps import sft_step  # noqa: E402
from antibody_fast.testing import assert_close  # noqa: E402


def _lora(model, kind):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f"lora_{kind}" in n}


def _batch():
    return FinetuneCollator(refusals=[[5, 6, 7]])(make_examples(4, seed=3)).answer_view()


@pytest.fixture
def aligned(tmp_path):
    """An "alignment" adapter: fresh LoRA (B = 0) trained 3 sft steps, saved; returns (dir, model, logits)."""
    model = add_lora(tiny_llama(seed=0), r=2, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        sft_step(model, _batch(), opt)
    path = tmp_path / "adapter"
    model.save_pretrained(str(path))
    batch = _batch()
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    return path, model, logits


def test_continue_trains_the_alignment_adapter(aligned):
    path, trained, logits = aligned
    saved_b = _lora(trained, "B")
    assert saved_b and all(float(b.abs().max()) > 0 for b in saved_b.values())  # B moved off zero
    model = load_adapter(tiny_llama(seed=0), path, trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    start_b = _lora(model, "B")
    assert start_b.keys() == saved_b.keys()
    for n in saved_b:  # fine-tuning starts from the alignment adapter's B, exactly
        assert torch.equal(start_b[n], saved_b[n]), n
    batch = _batch()
    with torch.no_grad():
        assert_close(model(**batch.model_inputs()).logits, logits, name="continued model = aligned model")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sft_step(model, batch, opt)
    after = _lora(model, "B")
    assert any(not torch.equal(after[n], saved_b[n]) for n in saved_b)  # and trains that same adapter
    frozen = load_adapter(tiny_llama(seed=0), path, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_merge_gives_a_fresh_adapter(aligned):
    path, _, logits = aligned
    merged = merge_adapter(tiny_llama(seed=0), path)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    model = add_lora(merged, r=2, seed=7)
    for n, b in _lora(model, "B").items():
        assert torch.equal(b, torch.zeros_like(b)), n  # fresh B = 0
    batch = _batch()
    with torch.no_grad():
        assert_close(model(**batch.model_inputs()).logits, logits, name="merged + fresh LoRA = aligned model")


def test_bad_adapter_paths(tmp_path, aligned):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_adapter(tiny_llama(seed=0), tmp_path / "nothing")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        merge_adapter(tiny_llama(seed=0), tmp_path / "nothing")
    path, trained, _ = aligned
    with pytest.raises(ValueError, match="already holds a PEFT adapter"):
        load_adapter(trained, path)


def test_adapter_metadata(tmp_path, aligned):
    path, _, _ = aligned
    assert read_adapter_metadata(path) == {}
    (tmp_path / "run_config.json").write_text(json.dumps({"command": "align", "method": "vaccine", "lr": 1}))
    assert read_adapter_metadata(path) == {"command": "align", "method": "vaccine"}
    write_adapter_metadata(path, command="align", method="booster")
    assert json.loads((path / ADAPTER_METADATA).read_text())["method"] == "booster"
    assert read_adapter_metadata(path) == {"command": "align", "method": "booster"}  # its own file wins
    (path / ADAPTER_METADATA).write_text("{broken")
    with pytest.raises(ValueError, match="unreadable adapter metadata"):
        read_adapter_metadata(path)
