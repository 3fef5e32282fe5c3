"""Per-token outputs of the fused lm_head op (``linear_token_logprob``: log-probs, entropy, top-1 flag), every
implementation against the float64 oracle (``linear_token_logprob_reference`` in float64)."""

import importlib

import pytest
import torch
from conftest import triton_devices

from antibody_fast.testing import assert_close_to_oracle

slp = importlib.import_module("antibody_fast.ops.sequence_logprob")

IMPLS = ["cpp", "triton", "torch"]


def _device(impl):
    return triton_devices()[0] if impl == "triton" else "cpu"


def _shape(impl):
    if impl == "triton" and not torch.cuda.is_available():
        return 2, 9, 32, 100  # the interpreter is slow
    return 3, 29, 48, 700


def _case(impl, dtype, seed=0, shift=True):
    """Inputs rounded to ``dtype`` (the oracle sees the same values in float64) and labels where a third of the
    scored positions are the oracle's argmax (so both top-1 outcomes occur)."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, V = _shape(impl)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(dtype).double()
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 2 / H**0.5).to(dtype).double()
    bias = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.5).to(dtype).double()
    labels = torch.randint(0, V, (B, T), generator=gen)
    top = (hidden @ weight.t() + bias).argmax(-1)
    pick = torch.rand(B, T, generator=gen) < 0.33
    labels = torch.where(pick, top.roll(1, dims=1) if shift else top, labels)  # shift: t scores labels[t + 1]
    labels[0, : T // 3] = -100
    labels[-1, T - 2 :] = -100
    return hidden, weight, bias, labels


CASES = [  # shift, softcap, bias
    (True, None, False),
    (True, 30.0, True),
    (False, None, True),
]


def _dtypes(impl):
    # bf16 everywhere but the Triton interpreter, which computes bf16 arithmetic wrongly (skipped below)
    return [torch.float32, torch.float16, torch.bfloat16]


def _run(fn, dt, hidden, weight, bias, labels, up, device, opts, **kw):
    """``fn`` on fresh leaves in dtype ``dt``: (its output, d(sum(log_probs * up)) / d hidden)."""
    h = hidden.to(device, dt).requires_grad_(True)
    b = bias.to(device, dt) if bias is not None else None
    out = fn(h, weight.to(device, dt), labels, bias=b, **opts, **kw)
    (g,) = torch.autograd.grad((out.log_probs.double() * up).sum(), [h])
    return out, g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift,softcap,use_bias", CASES)
def test_token_outputs_match_oracle(impl, shift, softcap, use_bias):
    device = _device(impl)
    for dtype in _dtypes(impl):
        if impl == "triton" and device == "cpu" and dtype == torch.bfloat16:
            continue
        hidden, weight, bias, labels = _case(impl, dtype, shift=shift)
        bias = bias if use_bias else None
        labels = labels.to(device)
        up = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(
            device
        )

        args = (hidden, weight, bias, labels, up, device, dict(softcap=softcap, shift=shift))
        ours, g = _run(slp.linear_token_logprob, dtype, *args, stats=True, impl=impl)
        ref, g_r = _run(slp.linear_token_logprob_reference, dtype, *args)
        orc, g_o = _run(slp.linear_token_logprob_reference, torch.float64, *args)
        tag = f"{impl} {dtype} shift={shift} softcap={softcap} bias={use_bias}"
        assert ours.log_probs.shape == labels.shape and ours.log_probs.dtype == torch.float32
        assert torch.equal(ours.mask.cpu(), orc.mask.cpu()), tag
        assert_close_to_oracle(
            ours.log_probs, ref.log_probs, orc.log_probs, dtype=dtype, name=f"log_probs {tag}"
        )
        assert_close_to_oracle(ours.entropy, ref.entropy, orc.entropy, dtype=dtype, name=f"entropy {tag}")
        assert_close_to_oracle(g, g_r, g_o, dtype=dtype, name=f"d_hidden {tag}")
        # top-1: equal to the oracle wherever the two largest logits are not a near tie at this dtype
        z = hidden @ weight.t() + (bias if bias is not None else 0)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        top2 = z.topk(2, dim=-1).values
        clear = ((top2[..., 0] - top2[..., 1]) > 1e-2).to(device) & orc.mask
        a, o = ours.is_top1[clear], orc.is_top1[clear]
        assert ours.is_top1.dtype == torch.bool
        assert torch.equal(a.cpu(), o.cpu()), f"is_top1 {tag}: {(a != o).sum().item()} of {a.numel()} differ"
        assert bool(o.any()) and not bool(o.all()), "the case must exercise both outcomes"
        assert not bool(ours.is_top1[~ours.mask].any()) and not bool(ours.entropy[~ours.mask].any())


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_form_equals_padded_and_stats_are_optional(impl):
    device = _device(impl)
    hidden, weight, _, labels = _case(impl, torch.float32, seed=1, shift=False)
    h, w, lab = hidden.float().to(device), weight.float().to(device), labels.to(device)
    padded = slp.linear_token_logprob(h, w, lab, shift=False, stats=True, impl=impl)
    rows = slp.linear_token_logprob(h.reshape(-1, h.shape[-1]), w, lab.reshape(-1), stats=True, impl=impl)
    assert rows.log_probs.shape == (lab.numel(),)
    torch.testing.assert_close(rows.log_probs, padded.log_probs.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(rows.entropy, padded.entropy.reshape(-1), rtol=0, atol=0)
    assert torch.equal(rows.is_top1, padded.is_top1.reshape(-1))
    plain = slp.linear_token_logprob(h, w, lab, shift=False, impl=impl)
    assert plain.entropy is None and plain.is_top1 is None
    torch.testing.assert_close(plain.log_probs, padded.log_probs, rtol=0, atol=0)
    # sums per sequence equal the per-sequence op
    seq = slp.linear_sequence_logprob(h, w, lab, shift=False, impl=impl)
    torch.testing.assert_close(padded.log_probs.sum(1), seq.logprob, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_and_bad_inputs(impl):
    device = _device(impl)
    h = torch.randn(2, 5, 16, device=device)
    w = torch.randn(40, 16, device=device)
    lab = torch.full((2, 5), -100, device=device)
    out = slp.linear_token_logprob(h, w, lab, stats=True, impl=impl)
    assert not bool(out.mask.any()) and not bool(out.log_probs.any()) and not bool(out.entropy.any())
    with pytest.raises(ValueError, match="rows form expects labels"):
        slp.linear_token_logprob(h[0], w, lab, impl=impl)
    with pytest.raises(ValueError, match="label"):
        slp.linear_token_logprob(h, w, torch.full((2, 5), 40, device=device), impl=impl, validate=True)
