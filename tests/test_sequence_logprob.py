"""Per-sequence log-likelihood ops: C++, Triton (interpreter on CPU) and torch paths against a float64 oracle."""

import importlib

import pytest
import torch

from antibody_fast import dispatch
from antibody_fast.testing import assert_close, assert_close_to_oracle

slp = importlib.import_module("antibody_fast.ops.sequence_logprob")

from conftest import triton_devices  # noqa: E402

IMPLS = ["cpp", "triton", "torch"]


def _device(impl):
    return triton_devices()[0] if impl == "triton" else "cpu"


def _shape(impl):
    # the interpreter is slow: smaller odd shapes for Triton on CPU
    if impl == "triton" and not torch.cuda.is_available():
        return 2, 9, 32, 100
    return 3, 37, 64, 1000


def _labels(B, T, V, gen, *, all_ignored_row=True, ignore_some=True):
    labels = torch.randint(0, V, (B, T), generator=gen)
    if ignore_some:
        labels[0, : T // 3] = -100  # a prompt
        labels[-1, T - 2 :] = -100  # padding
    if all_ignored_row and B > 1:
        labels[1] = -100
    return labels


def _inputs(B, T, H, V, gen, scale=0.5):
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * (scale / H**0.5) * 4
    bias = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5
    return hidden, weight, bias


def _run(fn, tensors, grad_w, upstream):
    """Call fn on fresh leaves; returns (logprob, num_tokens, grads of the leaves that require grad)."""
    out = fn(*tensors)
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad((out.logprob.double() * upstream).sum(), leaves) if leaves else ()
    return out.logprob, out.num_tokens, grads


def _leaves(ts, dtype, device, req):
    return [None if t is None else t.to(device, dtype).requires_grad_(r) for t, r in zip(ts, req)]


CASES = [
    # shift, softcap, bias, trainable weight
    (True, None, False, False),
    (False, None, True, True),
    (True, 30.0, True, False),
    (True, 20.0, False, True),
    (False, None, False, False),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shift,softcap,use_bias,trainable", CASES)
def test_linear_matches_oracle(impl, dtype, shift, softcap, use_bias, trainable):
    gen = torch.Generator().manual_seed(1)
    B, T, H, V = _shape(impl)
    device = _device(impl)
    hidden, weight, bias = _inputs(B, T, H, V, gen)
    labels = _labels(B, T, V, gen).to(device)
    bias = bias if use_bias else None
    upstream = torch.randn(B, generator=gen, dtype=torch.float64).to(device)
    req = [True, trainable, trainable]
    # round inputs to dtype once: the oracle sees exactly the same values in float64
    base = [None if t is None else t.to(dtype).to(torch.float64) for t in (hidden, weight, bias)]

    def ours(h, w, b):
        return slp.linear_sequence_logprob(h, w, labels, bias=b, softcap=softcap, shift=shift, impl=impl)

    def ref(h, w, b):
        return slp.linear_sequence_logprob_reference(h, w, labels, bias=b, softcap=softcap, shift=shift)

    lp, nt, g = _run(ours, _leaves(base, dtype, device, req), trainable, upstream)
    lp_r, nt_r, g_r = _run(ref, _leaves(base, dtype, device, req), trainable, upstream)
    lp_o, nt_o, g_o = _run(ref, _leaves(base, torch.float64, device, req), trainable, upstream)

    assert lp.dtype == torch.float32 and nt.dtype == torch.int64 and lp.shape == (B,)
    assert torch.equal(nt.cpu(), nt_o.cpu())
    assert nt[1].item() == 0 and lp[1].item() == 0.0  # the all-ignored sequence
    assert_close_to_oracle(lp, lp_r, lp_o, dtype=dtype, name="logprob")
    names = ["d_hidden", "d_weight", "d_bias"]
    kept = [n for n, t in zip(names, base) if t is not None and req[names.index(n)]]
    assert len(g) == len(kept)
    for name, a, r, o in zip(kept, g, g_r, g_o):
        assert a.dtype == dtype
        assert_close_to_oracle(a, r, o, dtype=dtype, name=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shift", [True, False])
def test_logits_matches_oracle(impl, dtype, shift):
    gen = torch.Generator().manual_seed(2)
    B, T, _, V = _shape(impl)
    device = _device(impl)
    logits = (torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 3).to(dtype).double()
    labels = _labels(B, T, V, gen).to(device)
    upstream = torch.randn(B, generator=gen, dtype=torch.float64).to(device)

    def ours(x):
        return slp.sequence_logprob(x, labels, shift=shift, impl=impl)

    def ref(x):
        return slp.sequence_logprob_reference(x, labels, shift=shift)

    lp, nt, (g,) = _run(ours, [logits.to(device, dtype).requires_grad_()], False, upstream)
    lp_r, _, (g_r,) = _run(ref, [logits.to(device, dtype).requires_grad_()], False, upstream)
    lp_o, nt_o, (g_o,) = _run(ref, [logits.to(device).requires_grad_()], False, upstream)
    assert torch.equal(nt.cpu(), nt_o.cpu())
    assert_close_to_oracle(lp, lp_r, lp_o, dtype=dtype, name="logprob")
    assert g.dtype == dtype
    assert_close_to_oracle(g, g_r, g_o, dtype=dtype, name="d_logits")


def test_logits_cpp_bfloat16():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 11, 300, generator=gen) * 3).bfloat16()
    labels = _labels(2, 11, 300, gen)
    x = logits.requires_grad_()
    out = slp.sequence_logprob(x, labels, impl="cpp")
    out.logprob.sum().backward()
    xr = logits.detach().double().requires_grad_()
    ref = slp.sequence_logprob_reference(xr, labels)
    ref.logprob.sum().backward()
    assert_close(out.logprob, ref.logprob.float(), dtype_for_tol=torch.bfloat16, name="logprob")
    assert_close(x.grad.double(), xr.grad, dtype_for_tol=torch.bfloat16, check_dtype=False, name="d_logits")


def test_gradcheck_reference():
    gen = torch.Generator().manual_seed(4)
    hidden, weight, bias = _inputs(2, 5, 6, 11, gen)
    labels = _labels(2, 5, 11, gen, all_ignored_row=False)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    f = lambda h, w, b: slp.linear_sequence_logprob_reference(h, w, labels, bias=b, softcap=3.0).logprob
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("trainable", [False, True])
def test_gradcheck_linear(impl, trainable):
    gen = torch.Generator().manual_seed(5)
    hidden, weight, bias = _inputs(3, 6, 7, 13, gen)
    labels = _labels(3, 6, 13, gen)
    hidden.requires_grad_()
    weight.requires_grad_(trainable)
    bias.requires_grad_(trainable)
    for softcap in (None, 4.0):
        f = lambda h, w, b, softcap=softcap: (
            slp.linear_sequence_logprob(h, w, labels, bias=b, softcap=softcap, impl=impl).logprob
        )
        assert torch.autograd.gradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_gradcheck_logits(impl):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 7, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = _labels(2, 7, 9, gen, all_ignored_row=False)
    assert torch.autograd.gradcheck(lambda x: slp.sequence_logprob(x, labels, impl=impl).logprob, (logits,))


@pytest.mark.parametrize("impl", IMPLS)
def test_paired_equals_separate(impl):
    gen = torch.Generator().manual_seed(7)
    B, T, H, V = _shape(impl)
    device = _device(impl)
    hidden, weight, _ = _inputs(B, T, H, V, gen)
    hidden, weight = hidden.float().to(device), weight.float().to(device)
    labels = _labels(B, T, V, gen).to(device)
    # refusal rows in packed form, different lengths
    n_r = 13
    h_r = torch.randn(n_r, H, generator=gen).to(device).requires_grad_()
    l_r = torch.randint(0, V, (n_r,), generator=gen).to(device)
    s_r = torch.tensor([0] * 5 + [1] * 8).to(device)
    for trainable in (False, True):
        w = weight.clone().requires_grad_(trainable)
        h = hidden.clone().requires_grad_()
        c, r = slp.paired_sequence_logprob(w, (h, labels), (h_r, l_r, s_r, 2), impl=impl)
        assert r.logprob.grad_fn is None and not r.logprob.requires_grad
        (c.logprob * torch.arange(1, B + 1, device=device)).sum().backward()
        assert h_r.grad is None
        w2 = weight.clone().requires_grad_(trainable)
        h2 = hidden.clone().requires_grad_()
        c2 = slp.linear_sequence_logprob(h2, w2, labels, impl=impl)
        (c2.logprob * torch.arange(1, B + 1, device=device)).sum().backward()
        with torch.no_grad():
            r2 = slp.linear_sequence_logprob(h_r, weight, l_r, seq_ids=s_r, num_seqs=2, impl=impl)
        assert_close(c.logprob, c2.logprob, name="completion logprob")
        assert_close(r.logprob, r2.logprob, name="refusal logprob")
        assert torch.equal(c.num_tokens, c2.num_tokens) and torch.equal(r.num_tokens, r2.num_tokens)
        assert_close(h.grad, h2.grad, name="d_hidden")
        if trainable:
            assert_close(w.grad, w2.grad, name="d_weight (completion rows only)")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift", [True, False])
def test_packed_equals_padded(impl, shift):
    gen = torch.Generator().manual_seed(8)
    B, T, H, V = _shape(impl)
    device = _device(impl)
    hidden, weight, bias = (t.float().to(device) for t in _inputs(B, T, H, V, gen))
    labels = _labels(B, T, V, gen).to(device)
    padded = slp.linear_sequence_logprob(hidden, weight, labels, bias=bias, shift=shift, impl=impl)
    # padding-free packing: drop the trailing 2 positions of the last sequence
    keep = torch.ones(B, T, dtype=torch.bool, device=device)
    keep[-1, T - 2 :] = False
    sids = torch.arange(B, device=device)[:, None].expand(B, T)[keep]
    packed = slp.linear_sequence_logprob(
        hidden[keep], weight, labels[keep], bias=bias, shift=shift, seq_ids=sids, num_seqs=B, impl=impl
    )
    assert_close(packed.logprob, padded.logprob, name="packed vs padded")
    assert torch.equal(packed.num_tokens, padded.num_tokens)
    logits = hidden @ weight.t() + bias
    lp1 = slp.sequence_logprob(logits, labels, shift=shift, impl=impl)
    lp2 = slp.sequence_logprob(logits[keep], labels[keep], shift=shift, seq_ids=sids, num_seqs=B, impl=impl)
    assert_close(lp2.logprob, lp1.logprob, name="packed vs padded (logits)")


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_many_chunks_no_ignored(impl):
    # V large enough that the row chunk (~8M logits) is smaller than the number of rows
    gen = torch.Generator().manual_seed(9)
    N, H, V = 450, 8, 40000
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (N,), generator=gen)
    sids = torch.arange(N) // 50
    h = hidden.float().requires_grad_()
    out = slp.linear_sequence_logprob(
        h, weight.float(), labels, seq_ids=sids, num_seqs=9, shift=False, impl=impl
    )
    out.logprob.sum().backward()
    ho = hidden.clone().requires_grad_()
    ref = slp.linear_sequence_logprob_reference(ho, weight, labels, seq_ids=sids, num_seqs=9, shift=False)
    ref.logprob.sum().backward()
    assert torch.equal(out.num_tokens, torch.full((9,), 50))
    assert_close(out.logprob, ref.logprob.float(), name="logprob")
    assert_close(h.grad, ho.grad.float(), name="d_hidden")


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_strategies_agree(impl, monkeypatch):
    gen = torch.Generator().manual_seed(10)
    B, T, H, V = _shape(impl)
    device = _device(impl)
    hidden, weight, _ = (t.float().to(device) for t in _inputs(B, T, H, V, gen))
    labels = _labels(B, T, V, gen).to(device)
    grads = {}
    for strategy in ("precompute", "recompute"):
        monkeypatch.setenv("ANTIBODY_FAST_FROZEN_STRATEGY", strategy)
        h = hidden.clone().requires_grad_()
        w = weight.clone()
        out = slp.linear_sequence_logprob(h, w, labels, impl=impl)
        (out.logprob * torch.tensor([0.5, -1.5, 2.0][:B], device=device)).sum().backward()
        assert w.grad is None
        grads[strategy] = h.grad
    assert_close(grads["precompute"], grads["recompute"], name="precompute vs recompute")


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_and_empty(impl):
    device = _device(impl)
    H, V = 16, 40
    w = torch.randn(V, H, device=device, requires_grad=True)
    h = torch.randn(2, 5, H, device=device, requires_grad=True)
    labels = torch.randint(0, V, (2, 5), device=device)
    with torch.no_grad():
        out = slp.linear_sequence_logprob(h, w, labels, impl=impl)
    assert out.logprob.grad_fn is None
    # empty batch
    out = slp.linear_sequence_logprob(h[:0], w, labels[:0], impl=impl)
    assert out.logprob.shape == (0,) and out.num_tokens.shape == (0,)
    out = slp.sequence_logprob(torch.randn(0, 5, V, device=device), labels[:0], impl=impl)
    assert out.logprob.shape == (0,)
    # packed with no rows but sequences: zeros
    e = torch.zeros(0, dtype=torch.long, device=device)
    out = slp.linear_sequence_logprob(h[0, :0], w, e, seq_ids=e, num_seqs=3, impl=impl)
    assert torch.equal(out.logprob.cpu(), torch.zeros(3)) and torch.equal(
        out.num_tokens.cpu(), torch.zeros(3, dtype=torch.long)
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_nonfinite_hidden_gives_nan(impl):
    device = _device(impl)
    gen = torch.Generator().manual_seed(11)
    H, V = 16, 40
    w = torch.randn(V, H, generator=gen).to(device)
    h = torch.randn(3, 6, H, generator=gen).to(device)
    labels = torch.randint(0, V, (3, 6), generator=gen).to(device)
    labels[2, :3] = -100
    h[0, 2, 5] = float("inf")  # scored row (scores labels[0, 3])
    h[1, 1, 0] = float("nan")  # scored row
    h[2, 1, 0] = float("nan")  # row 1 scores labels[2, 2] = ignored -> no effect
    out = slp.linear_sequence_logprob(h, w, labels, impl=impl)
    lp = out.logprob.cpu()
    assert torch.isnan(lp[0]) and torch.isnan(lp[1]) and torch.isfinite(lp[2])
    logits = h @ w.t()
    out = slp.sequence_logprob(logits, labels, impl=impl)
    lp = out.logprob.cpu()
    assert torch.isnan(lp[0]) and torch.isnan(lp[1]) and torch.isfinite(lp[2])


@pytest.mark.parametrize("impl", IMPLS)
def test_noncontiguous_inputs(impl):
    gen = torch.Generator().manual_seed(12)
    device = _device(impl)
    B, T, H, V = 2, 7, 16, 50
    big_h = torch.randn(T, B, 2 * H, generator=gen).to(device)
    hidden = big_h.transpose(0, 1)[:, :, ::2]  # [B, T, H], no unit stride
    big_w = torch.randn(2 * V, H, generator=gen).to(device)
    weight = big_w[::2]
    labels = torch.randint(0, V, (T, B), generator=gen).to(device).t()
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    out = slp.linear_sequence_logprob(hidden, weight, labels, impl=impl)
    ref = slp.linear_sequence_logprob(
        hidden.contiguous(), weight.contiguous(), labels.contiguous(), impl=impl
    )
    assert_close(out.logprob, ref.logprob, name="non-contiguous")
    logits = (hidden @ weight.t()).transpose(0, 1).contiguous().transpose(0, 1)
    out = slp.sequence_logprob(logits, labels, impl=impl)
    ref = slp.sequence_logprob(logits.contiguous(), labels.contiguous(), impl=impl)
    assert_close(out.logprob, ref.logprob, name="non-contiguous logits")


def test_bad_inputs():
    H, V = 8, 20
    h = torch.randn(2, 5, H, requires_grad=True)
    w = torch.randn(V, H)
    labels = torch.randint(0, V, (2, 5))
    f = slp.linear_sequence_logprob
    bad = labels.clone()
    bad[1, 3] = V
    for impl in ("cpp", "torch"):
        with pytest.raises(ValueError, match="outside"):
            f(h, w, bad, impl=impl)
        with pytest.raises(ValueError, match="outside"):
            slp.sequence_logprob(torch.randn(2, 5, V), bad, impl=impl)
    assert h.grad is None
    bad[1, 3] = -5
    with pytest.raises(ValueError, match="outside"):
        f(h, w, bad)
    # without host-side validation the C++ kernel still refuses
    with pytest.raises(ValueError):
        f(h, w, bad, impl="cpp", validate=False)
    # validation off on the Triton path (the CUDA default): NaN for the affected sequence, no stray read
    tri_dev = triton_devices()[0]
    if not dispatch.not_supported_reasons("linear_sequence_logprob", "triton", tri_dev, torch.float32):
        b2 = bad.clone()
        b2[1, 3] = V + 7
        b2 = b2.to(tri_dev)
        lp = f(h.detach().to(tri_dev), w.to(tri_dev), b2, impl="triton", validate=False).logprob.cpu()
        assert torch.isfinite(lp[0]) and torch.isnan(lp[1])
        lp = slp.sequence_logprob(
            torch.randn(2, 5, V, device=tri_dev), b2, impl="triton", validate=False
        ).logprob
        assert torch.isfinite(lp[0].cpu()) and torch.isnan(lp[1].cpu())
    with pytest.raises(ValueError, match="hidden size"):
        f(h, torch.randn(V, H + 1), labels)
    with pytest.raises(TypeError, match="must match"):
        f(h, w.double(), labels)
    with pytest.raises(ValueError, match="labels"):
        f(h, w, labels[:, :4])
    with pytest.raises(TypeError, match="int64"):
        f(h, w, labels.float())
    with pytest.raises(ValueError, match="bias"):
        f(h, w, labels, bias=torch.randn(V + 1))
    with pytest.raises(ValueError, match="softcap"):
        f(h, w, labels, softcap=0.0)
    with pytest.raises(ValueError, match="num_seqs"):
        f(h[0], w, labels[0], seq_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_ids"):
        f(h[0], w, labels[0], seq_ids=torch.full((5,), 3), num_seqs=2)
    with pytest.raises(ValueError, match="padded form"):
        f(h[0], w, labels)
    with pytest.raises(ValueError, match="unknown impl"):
        f(h, w, labels, impl="cuda")
    with pytest.raises(dispatch.ImplUnavailableError):
        f(h.double(), w.double(), labels, impl="triton")
    with pytest.raises(TypeError, match="completion"):
        slp.paired_sequence_logprob(w, h, (h, labels))


def test_dispatch_registration():
    ops = dispatch.registered_ops()
    assert "sequence_logprob" in ops and "linear_sequence_logprob" in ops
    assert dispatch.resolve_impl("linear_sequence_logprob", "auto", "cpu", torch.float32) == "cpp"
    assert dispatch.resolve_impl("sequence_logprob", "auto", "cpu", torch.float32) == "cpp"


def test_chunked_reference_matches():
    gen = torch.Generator().manual_seed(13)
    hidden, weight, bias = _inputs(3, 10, 8, 30, gen)
    labels = _labels(3, 10, 30, gen)
    a = slp.linear_sequence_logprob_chunked_reference(
        hidden, weight, labels, bias=bias, softcap=5.0, chunk_rows=7
    )
    b = slp.linear_sequence_logprob_reference(hidden, weight, labels, bias=bias, softcap=5.0)
    assert_close(a.logprob, b.logprob, name="chunked reference")
    assert torch.equal(a.num_tokens, b.num_tokens)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    gen = torch.Generator().manual_seed(14)
    hidden, weight, _ = (t.float() for t in _inputs(2, 6, 16, 40, gen))
    labels = _labels(2, 6, 40, gen)
    torch._dynamo.reset()

    def f(h, w, lab):
        out = slp.linear_sequence_logprob(h, w, lab, impl="cpp")
        return out.logprob, out.num_tokens

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    h1 = hidden.clone().requires_grad_()
    lp, nt = compiled(h1, weight, labels)
    lp.sum().backward()
    h2 = hidden.clone().requires_grad_()
    lp2, nt2 = f(h2, weight, labels)
    lp2.sum().backward()
    assert_close(lp, lp2, name="compiled logprob")
    assert torch.equal(nt, nt2)
    assert_close(h1.grad, h2.grad, name="compiled d_hidden")


@pytest.mark.gpu
@pytest.mark.parametrize("trainable", [False, True])
def test_triton_bfloat16_gpu(trainable):
    gen = torch.Generator().manual_seed(15)
    B, T, H, V = 3, 37, 64, 1000
    hidden, weight, bias = _inputs(B, T, H, V, gen)
    labels = _labels(B, T, V, gen).cuda()
    base = [t.bfloat16().double() for t in (hidden, weight, bias)]
    upstream = torch.randn(B, generator=gen, dtype=torch.float64).cuda()
    req = [True, trainable, trainable]

    def ours(h, w, b):
        return slp.linear_sequence_logprob(h, w, labels, bias=b, softcap=30.0, impl="triton")

    def ref(h, w, b):
        return slp.linear_sequence_logprob_reference(h, w, labels, bias=b, softcap=30.0)

    lp, _, g = _run(ours, _leaves(base, torch.bfloat16, "cuda", req), trainable, upstream)
    lp_r, _, g_r = _run(ref, _leaves(base, torch.bfloat16, "cuda", req), trainable, upstream)
    lp_o, _, g_o = _run(ref, _leaves(base, torch.float64, "cuda", req), trainable, upstream)
    assert_close_to_oracle(lp, lp_r, lp_o, dtype=torch.bfloat16, name="logprob")
    for a, r, o in zip(g, g_r, g_o):
        assert_close_to_oracle(a, r, o, dtype=torch.bfloat16, name="grad")


@pytest.mark.gpu
def test_triton_logits_bfloat16_gpu():
    gen = torch.Generator().manual_seed(16)
    logits = (torch.randn(3, 37, 1000, generator=gen) * 3).bfloat16().double()
    labels = _labels(3, 37, 1000, gen).cuda()
    x = logits.cuda().bfloat16().requires_grad_()
    out = slp.sequence_logprob(x, labels, impl="triton")
    out.logprob.sum().backward()
    xr = logits.cuda().bfloat16().requires_grad_()
    r = slp.sequence_logprob_reference(xr, labels)
    r.logprob.sum().backward()
    xo = logits.cuda().requires_grad_()
    o = slp.sequence_logprob_reference(xo, labels)
    o.logprob.sum().backward()
    assert_close_to_oracle(out.logprob, r.logprob, o.logprob, dtype=torch.bfloat16, name="logprob")
    assert_close_to_oracle(x.grad, xr.grad, xo.grad, dtype=torch.bfloat16, name="d_logits")


@pytest.mark.parametrize("strategy", ["precompute", "recompute"])
def test_torch_path_without_compaction(monkeypatch, strategy):
    # the torch path's CUDA branch (no nonzero: every row processed, masked), exercised on CPU
    twin = importlib.import_module("antibody_fast.ops.sequence_logprob._torch")
    monkeypatch.setattr(twin, "_compact", lambda device: False)
    monkeypatch.setattr(twin, "_TORCH_CHUNK_ELEMS", 10 * 100)  # several chunks
    monkeypatch.setenv("ANTIBODY_FAST_FROZEN_STRATEGY", strategy)
    gen = torch.Generator().manual_seed(17)
    hidden, weight, bias = _inputs(3, 11, 8, 100, gen)
    labels = _labels(3, 11, 100, gen)
    h = hidden.clone().requires_grad_()
    out = slp.linear_sequence_logprob(h, weight, labels, bias=bias, softcap=5.0, impl="torch")
    (out.logprob * torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)).sum().backward()
    ho = hidden.clone().requires_grad_()
    ref = slp.linear_sequence_logprob_reference(ho, weight, labels, bias=bias, softcap=5.0)
    (ref.logprob * torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)).sum().backward()
    assert_close(out.logprob, ref.logprob, name="logprob")
    assert_close(h.grad, ho.grad, name="d_hidden")
    x = (hidden @ weight.t()).requires_grad_()
    lp = slp.sequence_logprob(x, labels, impl="torch").logprob
    lp.sum().backward()
    xo = x.detach().clone().requires_grad_()
    slp.sequence_logprob_reference(xo, labels).logprob.sum().backward()
    assert_close(x.grad, xo.grad, name="d_logits")
