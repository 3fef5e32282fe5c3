"""FlatParameters and the fused flat ops: every impl against float64 oracles, bitwise restore,
PEFT integration (real backward into the flat grads, AdamW through the views), edge cases, bad input."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from antibody_fast.flat import FlatParameters
from antibody_fast.ops import flat_ops as F
from antibody_fast.testing import assert_close, assert_close_to_oracle, poison_

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _cpp_available() -> bool:
    from antibody_fast.dispatch import not_supported_reasons

    return not not_supported_reasons("sq_norm", "cpp", "cpu")


def impl_cases(dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    """(impl, device, dtype) triples that can run here. Triton on CPU: interpreter, fp32/fp16/fp64 only."""
    cases = []
    for dt in dtypes:
        cases.append(pytest.param("torch", "cpu", dt, id=f"torch-cpu-{str(dt)[6:]}"))
        cases.append(
            pytest.param(
                "cpp",
                "cpu",
                dt,
                id=f"cpp-cpu-{str(dt)[6:]}",
                marks=pytest.mark.skipif(not _cpp_available(), reason="C++ extension not built"),
            )
        )
        if HAS_CUDA:
            cases.append(pytest.param("triton", "cuda", dt, id=f"triton-cuda-{str(dt)[6:]}"))
            cases.append(pytest.param("torch", "cuda", dt, id=f"torch-cuda-{str(dt)[6:]}"))
        elif dt != torch.bfloat16:  # the interpreter computes bf16 wrongly (docs/design.md §5)
            cases.append(pytest.param("triton", "cpu", dt, id=f"triton-interp-{str(dt)[6:]}"))
    return cases


ALL_CASES = impl_cases()
# sizes: odd, not a multiple of any block; two groups exercise the list path (interpreter: keep them small)
SIZES = (3001, 77)


def _rand(n, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _groups(dtype, device, seed, scale=1.0):
    return [_rand(n, dtype, device, seed * 10 + i, scale) for i, n in enumerate(SIZES)]


def _cat64(xs):
    return torch.cat([x.detach().double().cpu() for x in xs])


def _tiny_linear_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _tiny_peft_llama(use_dora=False, modules_to_save=None, seed=0):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from antibody_fast.models import tiny_llama

    torch.manual_seed(seed)
    model = tiny_llama(vocab_size=128, hidden=32, layers=2, heads=4, kv_heads=2, seed=seed, intermediate=64)
    lcfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj"],
        use_dora=use_dora,
        modules_to_save=modules_to_save,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, lcfg)
    with torch.no_grad():  # non-zero lora_B, so that every adapter gets a non-zero gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    return model


def _lm_batch(seed=0, batch=2, seq=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


# --------------------------------------------------------------------------------------------------------------
# FlatParameters
# --------------------------------------------------------------------------------------------------------------
def test_flat_parameters_views_and_metadata():
    model = _tiny_linear_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    flat = FlatParameters(model)
    assert len(flat.groups) == 1 and flat.dtypes == [torch.float32]
    assert flat.names == [n for n, _ in model.named_parameters()]
    assert flat.numel == sum(p.numel() for p in model.parameters()) == flat.params.numel()
    layout = flat.layout()
    base = flat.params.data_ptr()
    for n, p in model.named_parameters():
        assert id(p) == ids[n]  # same Parameter objects
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad
        assert torch.equal(p.detach(), before[n])  # values preserved
        gi, off, shape = layout[n]
        assert gi == 0 and p.shape == shape
        assert p.data_ptr() == base + off * p.element_size()
        assert p.grad is not None and p.grad.data_ptr() == flat.grads.data_ptr() + off * p.element_size()
    # writing through the flat buffer is visible through the parameters and vice versa
    with torch.no_grad():
        flat.params.mul_(2.0)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), 2.0 * before[n])
    views = flat.unflatten(flat.params)
    assert set(views) == set(flat.names)
    assert flat.grads_attached()


def test_existing_grads_are_copied_into_flat_buffer():
    model = _tiny_linear_model()
    model(torch.randn(4, 5)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flat = FlatParameters(model)
    for n, v in flat.unflatten(flat.grads).items():
        assert torch.equal(v, grads[n])


def test_backward_accumulates_in_place_into_flat_grads():
    model = _tiny_linear_model()
    ref = copy.deepcopy(model)
    flat = FlatParameters(model)
    grad_objs = [p.grad for p in model.parameters()]
    x1, x2 = torch.randn(4, 5), torch.randn(6, 5)
    for x in (x1, x2):  # two backwards: the second must accumulate into the same views
        model(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
    assert all(p.grad is g for p, g in zip(model.parameters(), grad_objs))
    assert flat.grads_attached()
    expected = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    assert_close(flat.grads, expected)
    assert float(flat.grads.abs().sum()) > 0


def test_zero_grad_set_to_none_and_ensure_grad_views():
    model = _tiny_linear_model()
    flat = FlatParameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 5)
    model(x).sum().backward()
    opt.zero_grad()  # set_to_none=True: detaches .grad from the flat buffer
    assert not flat.grads_attached()
    model(x).sum().backward()  # fresh, detached grads
    detached = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    flat.ensure_grad_views()  # copies them into the flat buffer and re-attaches
    assert flat.grads_attached()
    assert_close(flat.grads, detached)
    # None grads read as zero
    opt.zero_grad()
    poison_(flat.grads)
    flat.ensure_grad_views()
    assert torch.equal(flat.grads, torch.zeros_like(flat.grads))
    # flat.zero_grad(): one fill, views attached
    model(x).sum().backward()
    flat.zero_grad()
    assert flat.grads_attached() and not bool(flat.grads.any())
    model(x).sum().backward()
    assert_close(flat.grads, detached)


def test_several_dtypes_give_several_groups():
    model = _tiny_linear_model()
    model[2].to(torch.bfloat16)
    model[0].bias.requires_grad_(False)
    flat = FlatParameters(model)
    assert flat.dtypes == [torch.float32, torch.bfloat16]
    assert flat.groups[0].names == ["0.weight"] and flat.groups[1].names == ["2.weight", "2.bias"]
    assert model[0].bias.grad is None  # frozen parameters are left alone
    with pytest.raises(ValueError, match="param_buffers"):
        _ = flat.params
    with pytest.raises(ValueError, match="grad_buffers"):
        _ = flat.grads
    # global norm over both groups, per-dtype storage
    sq = F.sq_norm(flat.param_buffers)
    expected = sum(
        float(p.detach().double().square().sum()) for p in (model[0].weight, model[2].weight, model[2].bias)
    )
    assert_close(sq, torch.tensor(expected, dtype=torch.float32))
    snap = flat.grad_snapshot()
    assert [s.dtype for s in snap] == [torch.float32, torch.bfloat16]
    assert all(s.data_ptr() != g.data_ptr() for s, g in zip(snap, flat.grad_buffers))


def test_no_trainable_params_error():
    model = _tiny_linear_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParameters(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParameters([])


def test_different_devices_error_leaves_params_untouched():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(4, device="meta"))
    a_ptr = a.data_ptr()
    with pytest.raises(ValueError, match="different devices"):
        FlatParameters([("a", a), ("b", b)])
    assert a.data_ptr() == a_ptr and a.grad is None


def test_bad_container_errors():
    with pytest.raises(TypeError):
        FlatParameters(torch.randn(3, requires_grad=True))
    with pytest.raises(ValueError, match="duplicate"):
        p = torch.nn.Parameter(torch.randn(2))
        FlatParameters([("x", p), ("x", torch.nn.Parameter(torch.randn(2)))])


def test_state_dict_roundtrip_keeps_views():
    model = _tiny_linear_model()
    flat = FlatParameters(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    with torch.no_grad():
        flat.params.add_(1.0)
    buf.seek(0)
    model.load_state_dict(torch.load(buf))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    base = flat.params.data_ptr()
    for n, (_gi, off, _) in flat.layout().items():
        assert model.get_parameter(n).data_ptr() == base + off * 4  # still views after load_state_dict


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_context_restores_bitwise_even_on_exception(dtype):
    model = _tiny_linear_model().to(dtype)
    flat = FlatParameters(model)
    theta0 = flat.params.clone()
    g = _rand(flat.numel, dtype, "cpu", 3)
    with flat.perturbed(g, 0.1) as b:
        assert not torch.equal(flat.params, theta0)
        assert not bool(b.nonfinite)
    assert torch.equal(
        flat.params.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        theta0.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    with pytest.raises(RuntimeError, match="boom"):
        with flat.perturbed(g, 0.1):
            raise RuntimeError("boom")
    assert torch.equal(flat.params, theta0)


# --------------------------------------------------------------------------------------------------------------
# PEFT integration
# --------------------------------------------------------------------------------------------------------------
def test_peft_llama_backward_lands_in_flat_and_adamw_matches_unpacked_copy():
    model = _tiny_peft_llama()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    flat = FlatParameters(model)  # packed after the optimizer was built
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert flat.names == names
    assert all(("lora_A" in n or "lora_B" in n) for n in names)
    assert len(names) == 2 * 3 * 2  # (A, B) x (q, k, v) x 2 layers
    for step in range(2):
        batch = _lm_batch(seed=step)
        model(**batch).loss.backward()
        ref(**batch).loss.backward()
        assert flat.grads_attached()
        ref_grads = torch.cat([p.grad.reshape(-1) for n, p in ref.named_parameters() if p.requires_grad])
        assert bool((flat.grads != 0).any())
        assert_close(flat.grads, ref_grads, name=f"grads step {step}")
        opt.step()
        ref_opt.step()
        flat.zero_grad()
        ref_opt.zero_grad()
        ref_params = torch.cat([p.detach().reshape(-1) for n, p in ref.named_parameters() if p.requires_grad])
        assert_close(flat.params, ref_params, name=f"params step {step}")
    # the parameters are still views after optimizer steps
    base = flat.params.data_ptr()
    for n, (_gi, off, _) in flat.layout().items():
        assert model.get_parameter(n).data_ptr() == base + off * 4


def test_peft_dora_and_modules_to_save_pack():
    model = _tiny_peft_llama(use_dora=True, modules_to_save=["lm_head"])
    flat = FlatParameters(model)
    names = flat.names
    assert any("lora_magnitude_vector" in n for n in names)
    assert any("modules_to_save" in n for n in names)
    batch = _lm_batch(seed=5)
    model(**batch).loss.backward()
    assert flat.grads_attached()
    views = flat.unflatten(flat.grads)
    for n in names:
        if "lora_magnitude_vector" in n or "modules_to_save" in n:
            assert bool(views[n].ne(0).any()), n
    theta0 = flat.params.clone()
    with flat.perturbed(flat.grad_snapshot(), 0.05):
        loss_p = model(**batch).loss
    assert torch.equal(flat.params, theta0)
    assert torch.isfinite(loss_p)


# --------------------------------------------------------------------------------------------------------------
# ops vs float64 oracles, every impl
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,device,dtype", ALL_CASES)
def test_sq_norm(impl, device, dtype):
    xs = _groups(dtype, device, 1)
    out = F.sq_norm(xs, impl=impl)
    assert out.shape == () and out.dtype == torch.float32 and out.device.type == device
    oracle = _cat64(xs).square().sum().reshape(())
    ref = F.sq_norm(xs, impl="torch")
    assert_close_to_oracle(out, ref, oracle, dtype=torch.float32, name="sq_norm")
    single = F.sq_norm(xs[0], impl=impl)
    assert_close_to_oracle(
        single,
        F.sq_norm(xs[0], impl="torch"),
        _cat64(xs[:1]).square().sum().reshape(()),
        dtype=torch.float32,
        name="sq_norm single",
    )


@pytest.mark.parametrize("impl,device,dtype", ALL_CASES)
def test_grad_dots(impl, device, dtype):
    a, h, p = _groups(dtype, device, 1), _groups(dtype, device, 2), _groups(dtype, device, 3, scale=0.5)
    out = F.grad_dots(a, h, p, impl=impl)
    assert out.shape == (3,) and out.dtype == torch.float32
    a64, s64 = _cat64(a), _cat64(h) - _cat64(p)
    oracle = torch.stack([a64 @ s64, a64 @ a64, s64 @ s64])
    assert_close_to_oracle(
        out, F.grad_dots(a, h, p, impl="torch"), oracle, dtype=torch.float32, name="grad_dots"
    )


@pytest.mark.parametrize("impl,device,dtype", ALL_CASES)
def test_perturb_matches_formula_and_restores_bitwise(impl, device, dtype):
    theta = _groups(dtype, device, 4)
    g = _groups(dtype, device, 5, scale=3.0)
    theta0 = [t.clone() for t in theta]
    rho, eps = 0.1, 1e-7
    out = [poison_(torch.empty_like(t)) for t in theta]
    b = F.perturb_(theta, g, rho, eps, out=out, impl=impl)
    assert b.data is not None and all(x is y for x, y in zip(b.data, out))
    assert not bool(b.nonfinite)
    assert all(torch.equal(x, y) for x, y in zip(b.data, theta0))  # bitwise backup
    g64 = _cat64(g)
    oracle = _cat64(theta0) - rho * g64 / (g64.norm() + eps)
    reference = torch.cat([t.cpu().double() for t in F.perturb_reference(theta0, g, rho, eps)])
    assert_close_to_oracle(_cat64(theta), reference, oracle, dtype=dtype, name="perturb")
    assert_close(b.norm, g64.norm().float().to(b.norm.device), dtype_for_tol=torch.float32)
    F.restore_(theta, b, impl=impl)
    for t, t0 in zip(theta, theta0):
        assert torch.equal(t, t0)


def _combine_cases():
    out = []
    for case in ALL_CASES:
        impl, device, dtype = case.values
        full = dtype in (torch.float32, torch.bfloat16)
        for kind in ("float", "tensor"):
            for with_r in (True, False):
                for alias in (True, False):
                    if full or (kind == "float" and with_r and not alias):
                        out.append(
                            pytest.param(
                                impl,
                                device,
                                dtype,
                                kind,
                                with_r,
                                alias,
                                id=f"{case.id}-{kind}-r{int(with_r)}-alias{int(alias)}",
                            )
                        )
    return out


@pytest.mark.parametrize("impl,device,dtype,lambda_kind,with_r,alias", _combine_cases())
def test_antibody_combine(impl, device, dtype, lambda_kind, with_r, alias):
    a, h, p, r = (_groups(dtype, device, s) for s in (1, 2, 3, 4))
    lt_v, lr_v = 0.37, 0.05
    if lambda_kind == "tensor":
        lt = torch.tensor(lt_v, dtype=torch.float32, device=device)
        lr = torch.tensor(lr_v, dtype=torch.float32, device=device)
    else:
        lt, lr = lt_v, lr_v
    a0 = [x.clone() for x in a]
    out = [x for x in a] if alias else [poison_(torch.empty_like(x)) for x in a]
    F.antibody_combine_(out, a, h, p, r if with_r else None, lt, lr, impl=impl)
    oracle = _cat64(a0) + lt_v * (_cat64(h) - _cat64(p)) + (lr_v * _cat64(r) if with_r else 0.0)
    reference = torch.cat(
        [x.cpu().double() for x in F.antibody_combine_reference(a0, h, p, r if with_r else None, lt, lr)]
    )
    assert_close_to_oracle(_cat64(out), reference, oracle, dtype=dtype, name="combine")
    if not alias:
        assert all(torch.equal(x, y) for x, y in zip(a, a0))


@pytest.mark.parametrize("impl,device,dtype", ALL_CASES)
@pytest.mark.parametrize("max_norm", [1.0, 1e6])
def test_clip_matches_torch_clip_grad_norm(impl, device, dtype, max_norm):
    g = _groups(dtype, device, 6)
    g0 = [x.clone() for x in g]
    norm = F.clip_(g, max_norm, impl=impl)
    assert norm.shape == () and norm.dtype == torch.float32
    g64 = [x.double().cpu() for x in g0]
    ps = [torch.nn.Parameter(torch.zeros_like(x)) for x in g64]
    for prm, x in zip(ps, g64):
        prm.grad = x.clone()
    oracle_norm = torch.nn.utils.clip_grad_norm_(ps, max_norm)
    oracle = torch.cat([prm.grad for prm in ps])
    ref_g, ref_norm = F.clip_reference(g0, max_norm)
    assert_close_to_oracle(
        norm.reshape(1), ref_norm.reshape(1), oracle_norm.reshape(1), dtype=torch.float32, name="clip norm"
    )
    assert_close_to_oracle(_cat64(g), _cat64(ref_g), oracle, dtype=dtype, name="clipped grads")
    if max_norm == 1e6:  # no clipping: untouched bit for bit
        assert all(torch.equal(x, y) for x, y in zip(g, g0))


# --------------------------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,device,dtype", impl_cases((torch.float32, torch.bfloat16)))
def test_zero_gradient_no_perturbation(impl, device, dtype):
    theta = _groups(dtype, device, 7)
    theta0 = [t.clone() for t in theta]
    g = [torch.zeros_like(t) for t in theta]
    b = F.perturb_(theta, g, 0.1, impl=impl)
    assert not bool(b.nonfinite)
    assert float(b.sq_norm) == 0.0
    assert all(torch.equal(t, t0) for t, t0 in zip(theta, theta0))
    F.restore_(theta, b, impl=impl)
    assert all(torch.equal(t, t0) for t, t0 in zip(theta, theta0))


@pytest.mark.parametrize("impl,device,dtype", impl_cases((torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_norm_skips_perturbation(impl, device, dtype, bad):
    theta = _groups(dtype, device, 8)
    theta0 = [t.clone() for t in theta]
    g = _groups(dtype, device, 9)
    g[1][5] = bad
    b = F.perturb_(theta, g, 0.1, impl=impl)
    assert bool(b.nonfinite)
    assert not torch.isfinite(b.sq_norm)
    for t, t0 in zip(theta, theta0):
        assert torch.equal(t, t0)
        assert bool(torch.isfinite(t).all())
    F.restore_(theta, b, impl=impl)
    assert all(torch.equal(t, t0) for t, t0 in zip(theta, theta0))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter
@pytest.mark.parametrize("impl,device,dtype", impl_cases((torch.float32,)))
def test_nonfinite_clip_follows_torch(impl, device, dtype):
    g = _groups(dtype, device, 10)
    g[0][3] = float("inf")
    norm = F.clip_(g, 1.0, impl=impl)
    assert torch.isinf(norm)
    ps = [torch.nn.Parameter(torch.zeros_like(x)) for x in g]
    g_ref = _groups(dtype, device, 10)
    g_ref[0][3] = float("inf")
    for prm, x in zip(ps, g_ref):
        prm.grad = x
    torch.nn.utils.clip_grad_norm_(ps, 1.0)
    for x, prm in zip(g, ps):
        assert_close(x, prm.grad, equal_nan=True)


# --------------------------------------------------------------------------------------------------------------
# bad input: clear errors before anything is written
# --------------------------------------------------------------------------------------------------------------
def test_bad_input_errors_before_writing():
    theta = [torch.randn(10), torch.randn(5)]
    theta0 = [t.clone() for t in theta]
    with pytest.raises(ValueError, match="numel"):
        F.perturb_(theta, [torch.randn(10), torch.randn(6)], 0.1)
    with pytest.raises(ValueError, match="dtype"):
        F.perturb_(theta, [torch.randn(10), torch.randn(5, dtype=torch.float64)], 0.1)
    with pytest.raises(ValueError, match="flat tensors"):
        F.perturb_(theta, [torch.randn(10)], 0.1)
    with pytest.raises(ValueError, match="device"):
        F.perturb_(theta[0], torch.randn(10, device="meta"), 0.1)
    with pytest.raises(ValueError, match="1-D"):
        F.sq_norm(torch.randn(2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        F.sq_norm(torch.randn(10)[::2])
    with pytest.raises(TypeError, match="dtype"):
        F.sq_norm(torch.arange(4))
    with pytest.raises(TypeError):
        F.perturb_(theta, theta0, rho=torch.tensor(0.1))
    with pytest.raises(ValueError, match="alias"):
        F.antibody_combine_(theta, theta0, theta, theta0, None, 0.5)
    with pytest.raises(ValueError, match="numel"):
        F.antibody_combine_(theta, theta0, theta0, [torch.randn(10), torch.randn(4)], None, 0.5)
    with pytest.raises(ValueError, match="lambda_t"):
        F.antibody_combine_(
            [torch.randn(10)], [torch.randn(10)], [torch.randn(10)], [torch.randn(10)], None, torch.randn(2)
        )
    with pytest.raises(ValueError, match="requires grad"):
        F.clip_(torch.randn(4, requires_grad=True), 1.0)
    with pytest.raises(ValueError, match="unknown impl"):
        F.sq_norm(theta, impl="cuda")
    for t, t0 in zip(theta, theta0):
        assert torch.equal(t, t0)


def test_explicit_unavailable_impl_says_why():
    from antibody_fast.dispatch import ImplUnavailableError

    with pytest.raises(ImplUnavailableError, match="cpp"):
        F.sq_norm(torch.randn(4, device="meta"), impl="cpp")


# --------------------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------------------
def test_custom_ops_registered_and_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in ("sq_norm", "grad_dots", "perturb_", "restore_", "antibody_combine_", "clip_"):
        assert hasattr(torch.ops.antibody_fast, name), name
    x = torch.randn(33)
    torch.library.opcheck(torch.ops.antibody_fast.sq_norm.default, ([x, x[:7].clone()], "torch"))
    torch.library.opcheck(torch.ops.antibody_fast.grad_dots.default, ([x], [x + 1], [x * 2], "torch"))
    impls = ["torch"] + (["cpp"] if _cpp_available() else [])
    xs = [torch.randn(33), torch.randn(5, dtype=torch.float64)]
    for impl in impls:  # mutating ops: schema, fake impls, in-place semantics
        th = [torch.randn_like(t) for t in xs]
        bk = [torch.empty_like(t) for t in xs]
        torch.library.opcheck(torch.ops.antibody_fast.perturb_.default, (th, bk, xs, None, 0.1, 1e-7, impl))
        torch.library.opcheck(torch.ops.antibody_fast.clip_.default, (th, None, 0.1, impl))
        out = [torch.empty_like(t) for t in xs]
        torch.library.opcheck(
            torch.ops.antibody_fast.antibody_combine_.default,
            (out, xs, xs, xs, [], torch.tensor(0.5), 0.0, None, 0.1, impl),
        )
        torch.library.opcheck(torch.ops.antibody_fast.restore_.default, (th, xs, impl))
    with FakeTensorMode():
        fx = torch.empty(100)
        assert F.sq_norm(fx, impl="torch").shape == ()
        assert F.grad_dots(fx, fx, fx, impl="torch").shape == (3,)


@pytest.mark.skipif(not _cpp_available(), reason="C++ extension not built")
def test_auto_picks_cpp_on_cpu():
    from antibody_fast.dispatch import explain

    for op in ("sq_norm", "perturb_", "restore_", "grad_dots", "antibody_combine_", "clip_"):
        assert explain(op, "cpu")["auto"] == "cpp"
        assert hasattr(torch.ops.antibody_fast_cpp, op)  # one name in every layer


# --------------------------------------------------------------------------------------------------------------
# GPU: no host sync anywhere
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_host_sync_cuda(dtype):
    n = 1_000_003
    theta = [torch.randn(n, device="cuda", dtype=dtype), torch.randn(1000, device="cuda", dtype=dtype)]
    ga, gh, gp, gr = ([torch.randn_like(t) for t in theta] for _ in range(4))
    lam = torch.tensor(0.3, device="cuda")

    def run():
        b = F.perturb_(theta, gh, 0.1)
        F.restore_(theta, b)
        d = F.grad_dots(ga, gh, gp)
        F.antibody_combine_(ga, ga, gh, gp, gr, lam, 0.05)
        F.antibody_combine_(ga, ga, gh, gp, None, 0.5)
        return F.clip_(ga, 1.0), F.sq_norm(ga), d, b.nonfinite

    from antibody_fast.dispatch import explain

    assert explain("sq_norm", "cuda")["auto"] == "triton"
    run()  # compile the kernels first
    torch.cuda.synchronize()
    theta0 = [t.clone() for t in theta]
    expected_dots = F.grad_dots(ga, gh, gp, impl="torch")
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, _, dots, _ = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.equal(t, t0) for t, t0 in zip(theta, theta0))
    assert_close(dots, expected_dots, dtype_for_tol=dtype)


_DETERMINISM_SCRIPT = """
import sys, torch
from antibody_fast.ops import flat_ops as F
g = torch.Generator().manual_seed(0)
xs = [torch.randn(n, generator=g) for n in (100_003, 77)]
h = [torch.randn(x.shape, generator=g) for x in xs]
p = [torch.randn(x.shape, generator=g) for x in xs]
th = [torch.randn(x.shape, generator=g) for x in xs]
F.perturb_(th, h, 0.1, impl="cpp")
out = [F.sq_norm(xs, impl="cpp").reshape(1), F.grad_dots(xs, h, p, impl="cpp"), F.sq_norm(
    [x.to(torch.bfloat16) for x in xs], impl="cpp").reshape(1)] + th
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(not _cpp_available(), reason="C++ extension not built")
def test_cpp_results_identical_across_isa_and_threads(tmp_path):
    """The AVX2 and baseline builds, with 1 or 2 threads, give bit-identical results (fixed lanes/blocks)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "det.py"
    script.write_text(_DETERMINISM_SCRIPT)
    results = []
    for no_avx2, threads in (("0", "2"), ("1", "1")):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        env.pop("ANTIBODY_FAST_CPP_NO_AVX2", None)
        if no_avx2 == "1":
            env["ANTIBODY_FAST_CPP_NO_AVX2"] = "1"
        path = tmp_path / f"out{no_avx2}.pt"
        subprocess.run([sys.executable, str(script), str(path)], env=env, check=True, timeout=120)
        results.append(torch.load(path))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl,device,dtype", impl_cases((torch.float32,)))
def test_tiny_groups(impl, device, dtype):
    """Groups of 1, 16 and 33 elements (Triton specialises n == 1; remainders of the C++ lanes)."""
    sizes = (1, 16, 33)
    mk = lambda s: [_rand(n, dtype, device, s * 10 + i) for i, n in enumerate(sizes)]
    a, h, p, r, th = mk(1), mk(2), mk(3), mk(4), mk(5)
    oracle = _cat64(a).square().sum().reshape(())
    assert_close_to_oracle(F.sq_norm(a, impl=impl), F.sq_norm(a, impl="torch"), oracle, dtype=dtype)
    th0 = [t.clone() for t in th]
    b = F.perturb_(th, h, 0.1, impl=impl)
    ref = torch.cat([t.double().cpu() for t in F.perturb_reference(th0, h, 0.1)])
    o = _cat64(th0) - 0.1 * _cat64(h) / (_cat64(h).norm() + 1e-7)
    assert_close_to_oracle(_cat64(th), ref, o, dtype=dtype, name="perturb tiny")
    F.restore_(th, b, impl=impl)
    assert all(torch.equal(x, y) for x, y in zip(th, th0))
    out = [poison_(torch.empty_like(x)) for x in a]
    F.antibody_combine_(out, a, h, p, r, 0.5, 0.25, impl=impl)
    o = _cat64(a) + 0.5 * (_cat64(h) - _cat64(p)) + 0.25 * _cat64(r)
    ref = torch.cat([x.double().cpu() for x in F.antibody_combine_reference(a, h, p, r, 0.5, 0.25)])
    assert_close_to_oracle(_cat64(out), ref, o, dtype=dtype, name="combine tiny")
    d = F.grad_dots(a, h, p, impl=impl)
    s64 = _cat64(h) - _cat64(p)
    o = torch.stack([_cat64(a) @ s64, _cat64(a) @ _cat64(a), s64 @ s64])
    assert_close_to_oracle(d, F.grad_dots(a, h, p, impl="torch"), o, dtype=dtype, name="dots tiny")
    norm = F.clip_(a, 0.5, impl=impl)
    assert_close(norm.cpu(), oracle.sqrt().float(), dtype_for_tol=dtype)


def test_perturbed_not_reentrant():
    flat = FlatParameters(_tiny_linear_model())
    theta0 = flat.params.clone()
    g = torch.randn(flat.numel)
    with flat.perturbed(g, 0.1):
        with pytest.raises(RuntimeError, match="re-entrant"):
            with flat.perturbed(g, 0.1):
                pass
    assert torch.equal(flat.params, theta0)


def _dist_worker(rank, world, store_path, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        full = torch.randn(2 * 1001, generator=g)
        full_h = torch.randn(2 * 1001, generator=g)
        theta_full = torch.randn(2 * 1001, generator=g)
        shard = slice(rank * 1001, (rank + 1) * 1001)  # each rank holds half of every flat tensor
        x, h = full[shard].clone(), full_h[shard].clone()
        theta = theta_full[shard].clone()
        sq = F.sq_norm(x, group=dist.group.WORLD, impl="torch")
        dots = F.grad_dots(x, h, x * 0.5, group=dist.group.WORLD, impl="cpp" if _cpp_available() else "torch")
        b = F.perturb_(theta, h, 0.1, group=dist.group.WORLD)
        clipped = x.clone()
        norm = F.clip_(clipped, 1.0, group=dist.group.WORLD)
        torch.save(
            {"sq": sq, "dots": dots, "theta": theta, "norm": norm, "clipped": clipped, "bnorm": b.norm},
            f"{out_path}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_process_group_gives_global_norms(tmp_path):
    """Two gloo ranks, each with half of the flat tensors: norms/dots/perturb/clip equal the unsharded ones."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    res = [torch.load(f"{out}.{r}") for r in range(2)]
    g = torch.Generator().manual_seed(0)
    full, full_h, theta_full = (torch.randn(2 * 1001, generator=g) for _ in range(3))
    f64, h64 = full.double(), full_h.double()
    s64 = h64 - 0.5 * f64
    for r in res:
        assert_close(r["sq"], f64.square().sum().float())
        assert_close(r["dots"], torch.stack([f64 @ s64, f64 @ f64, s64 @ s64]).float())
        assert_close(r["bnorm"], h64.norm().float())
        assert_close(r["norm"], f64.norm().float())
    theta = torch.cat([r["theta"] for r in res])
    assert_close(theta, (theta_full.double() - 0.1 * h64 / (h64.norm() + 1e-7)).float())
    clipped = torch.cat([r["clipped"] for r in res])
    assert_close(clipped, (f64 * min(1.0, 1.0 / (f64.norm().item() + 1e-6))).float())


@pytest.mark.parametrize("impl,device,dtype", impl_cases((torch.float32, torch.float64)))
def test_given_sq_norm_path_matches_fused(impl, device, dtype):
    """The path used with a process group (squared norm computed first, then passed in) matches the fused one."""
    theta = _groups(dtype, device, 11)
    g = _groups(dtype, device, 12)
    fused = [t.clone() for t in theta]
    b = F.perturb_(fused, g, 0.2, impl=impl)
    given = [t.clone() for t in theta]
    sq = torch.ops.antibody_fast.sq_norm(g, impl)
    sq_used, flag = torch.ops.antibody_fast.perturb_(
        given, [torch.empty_like(t) for t in theta], g, sq, 0.2, 1e-7, impl
    )
    assert not bool(flag)
    assert_close(sq_used, b.sq_norm)
    for x, y in zip(given, fused):
        assert_close(x, y)
    c1, c2 = [x.clone() for x in g], [x.clone() for x in g]
    n1 = F.clip_(c1, 0.5, impl=impl)
    n2 = torch.ops.antibody_fast.clip_(c2, torch.ops.antibody_fast.sq_norm(c2, impl), 0.5, impl)
    assert_close(n1, n2)
    for x, y in zip(c1, c2):
        assert_close(x, y)


@pytest.mark.gpu
def test_launch_counts_cuda():
    """Triton on one dtype group: <= 2 device launches per op."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    n = 1_000_003
    theta, ga, gh, gp, gr = (torch.randn(n, device="cuda") for _ in range(5))
    lam = torch.tensor(0.3, device="cuda")
    ops = {
        "sq_norm": (lambda: F.sq_norm(ga), 2),
        "grad_dots": (lambda: F.grad_dots(ga, gh, gp), 2),
        "perturb_": (lambda: F.perturb_(theta, gh, 0.1), 2),
        "antibody_combine_": (lambda: F.antibody_combine_(ga, ga, gh, gp, gr, lam, 0.05), 1),
        "clip_": (lambda: F.clip_(ga, 1.0), 2),
    }
    for name, (fn, limit) in ops.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
        assert 1 <= len(kernels) <= limit, (name, kernels)
    b = F.perturb_(theta, gh, 0.1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.restore_(theta, b)
        torch.cuda.synchronize()
    assert len([e for e in prof.events() if e.device_type == DeviceType.CUDA]) == 1
