"""Forward compatibility with transformers: the steps pass the key/value cache under the name the trunk's
``forward`` takes (``cache`` in newer transformers, ``past_key_values`` before) and read it back under the
output's own name, so no deprecated argument is used on any step, and the prefix-cache refusal scoring keeps
working (it does not silently fall back to full scoring). When it does fall back, it says so once.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_align_batch, make_finetune_batch, tiny_model
from torch import nn

from antibody_fast import _model
from antibody_fast.steps import AlignConfig, AlignState, FinetuneConfig, align_step, sft_step, weighted_step
from antibody_fast.steps import finetune as finetune_mod
from antibody_fast.testing import assert_close


class _NewStyleOutput:
    """An output of a transformers that renamed ``past_key_values`` to ``cache``: the old name still works
    but warns (the deprecation period)."""

    def __init__(self, hidden, cache):
        self.last_hidden_state = hidden
        self.cache = cache

    @property
    def past_key_values(self):
        warnings.warn("`past_key_values` is deprecated, use `cache`", FutureWarning, stacklevel=2)
        return self.cache


class _NewStyleTrunk(nn.Module):
    """The trunk as a newer transformers would have it: ``forward(..., cache=None, ...)``; the old keyword is
    accepted through ``**kwargs`` with a FutureWarning (``strict=True``: removed, a TypeError)."""

    def __init__(self, inner: nn.Module, strict: bool = False):
        super().__init__()
        self.inner = inner
        self.strict = strict
        self.seen: list[str] = []

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None, **kw
    ):
        if "past_key_values" in kw:
            if self.strict:
                raise TypeError("forward() got an unexpected keyword argument 'past_key_values'")
            warnings.warn("`past_key_values` is deprecated; use `cache`", FutureWarning, stacklevel=2)
            cache = kw.pop("past_key_values")
        self.seen.append("cache" if cache is not None else "none")
        out = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=use_cache,
            **kw,
        )
        return _NewStyleOutput(out.last_hidden_state, out.past_key_values if use_cache else None)


def _errors_on_deprecations():
    """FutureWarning / DeprecationWarning raised while our steps run become errors (the models are built
    before, so a warning raised by model construction in a third-party library does not count)."""
    cm = warnings.catch_warnings()
    cm.__enter__()
    warnings.simplefilter("error", FutureWarning)
    warnings.simplefilter("error", DeprecationWarning)
    warnings.simplefilter("error", RuntimeWarning)  # a prefix-cache fallback is a RuntimeWarning
    return cm


def _opt(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _spy_crop(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    real = finetune_mod._crop_to_prompt
    monkeypatch.setattr(finetune_mod, "_crop_to_prompt", lambda *a: calls.append(real(*a)) or calls[-1])
    return calls


def _run_steps(model, monkeypatch) -> list[bool]:
    opt = _opt(model)
    calls = _spy_crop(monkeypatch)
    cm = _errors_on_deprecations()
    try:
        weighted_step(
            model, make_finetune_batch(4, seed=1), opt, FinetuneConfig(refusal_scoring="prefix_cache")
        )
        sft_step(model, make_finetune_batch(4, seed=2), opt)
        align_step(model, make_align_batch(seed=3), opt, AlignState(), AlignConfig())
    finally:
        cm.__exit__(None, None, None)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_steps_raise_no_deprecation_warning_and_use_the_prefix_cache(arch, monkeypatch):
    """With the installed transformers: no FutureWarning / DeprecationWarning from any step, and the refusals
    are scored as a continuation of the prompt's cache (the crop succeeded, no fallback)."""
    model = tiny_model(arch)
    calls = _run_steps(model, monkeypatch)
    assert calls == [True], "the prefix-cache path was not taken"
    assert _model.parts(model).cache_ok


@pytest.mark.parametrize("strict", [False, True], ids=["deprecated", "removed"])
def test_new_style_cache_argument_is_used(strict, monkeypatch):
    """A trunk whose forward takes ``cache=`` (``past_key_values`` deprecated, or removed): the steps pass
    ``cache=``, read ``out.cache``, keep the prefix-cache path and give the same result as the old-style
    trunk."""
    model = tiny_model("llama")
    ref = tiny_model("llama")
    p = _model.parts(model)
    p.trunk = _NewStyleTrunk(p.trunk, strict=strict)
    calls = _run_steps(model, monkeypatch)
    assert calls == [True], "the prefix-cache path was not taken"
    assert "cache" in p.trunk.seen, "the refusal continuation did not receive the cache"
    assert p.cache_arg == "cache"
    _run_steps(ref, monkeypatch)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert_close(a, b, name=n)


def test_old_style_cache_argument_is_detected_from_the_signature():
    model = tiny_model("llama")
    p = _model.parts(model)
    assert _model.cache_argument(p) == "past_key_values"  # transformers without a ``cache`` argument
    p2 = _model.Parts(_NewStyleTrunk(p.trunk), p.lm_head, p.softcap)
    assert _model.cache_argument(p2) == "cache"


def test_prefix_cache_fallback_says_so_once_with_the_reason(monkeypatch):
    """A trunk that returns no cache: the refusals are scored by a full forward, and a RuntimeWarning naming
    the reason is given once (not on every step)."""
    model = tiny_model("llama")
    p = _model.parts(model)
    inner = p.trunk

    class NoCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            kw["use_cache"] = False
            return self.inner(**kw)

    p.trunk = NoCache()
    opt = _opt(model)
    with pytest.warns(RuntimeWarning, match="returned no key/value cache") as rec:
        weighted_step(model, make_finetune_batch(4, seed=1), opt)
    assert sum("falls back" in str(w.message) for w in rec) == 1
    assert not p.cache_ok
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        weighted_step(model, make_finetune_batch(4, seed=2), opt)  # no second message


def test_add_lora_and_load_adapter_raise_no_deprecation_warning(tmp_path):
    """peft's read of transformers' deprecated ``is_gradient_checkpointing`` is not passed on to our callers."""
    from antibody_fast import models

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        m = models.add_lora(models.tiny_llama(vocab_size=128, seed=0), r=2)
        m.save_pretrained(tmp_path / "adapter")
        models.load_adapter(models.tiny_llama(vocab_size=128, seed=0), tmp_path / "adapter")
        models.merge_adapter(models.tiny_llama(vocab_size=128, seed=0), tmp_path / "adapter")
