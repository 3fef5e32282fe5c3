"""Flat-buffer ops on the 448 LoRA tensors of Llama-2-7B, r=16 on every linear (~40M parameters).

Per layer: q,k,v,o: A[16,4096], B[4096,16]; gate, up: A[16,4096], B[11008,16]; down: A[16,11008], B[4096,16];
x32 layers = 448 tensors (quick mode, ``ANTIBODY_FAST_BENCH_QUICK=1``: 8 layers, 112 tensors, ~10M).

Operations (one group each):

* ``norm``: the global gradient norm (ours: ``sq_norm``, the squared norm every caller needs);
* ``perturb_restore``: ``theta <- theta - rho*g/||g||`` with a backup, then the bitwise restore;
* ``align_vector_step``: the vector work of one alignment step after the backward passes: the three dot
  products of the lambda rule, lambda on the device, ``g_a + lambda*(g_h-g_p) + lambda_ref*g_r``, clip.

Providers:

* ``authors-loop``: per-tensor Python loop with a dict of cloned backups (the authors' style);
* ``torch-foreach``: ``torch._foreach_*`` over the per-tensor views, scalars kept on the device;
* ``ours``: :mod:`antibody_fast.ops.flat_ops` on the flat buffers (``impl="auto"``: C++ on CPU, Triton on
  CUDA);
* ``floor``: the streaming passes the op cannot avoid, run as bare torch primitives on flat buffers of the
  same size, with the same bytes read and written (e.g. perturb+restore = read g for the norm; read theta
  and g, write theta and the backup; read the backup and write theta). Ours should be within 1.5x of it.

Every case records ``launches``: on CUDA the number of device kernels (profiler), on CPU the number of
top-level operator calls (profiler) -- the dispatcher round trips a per-tensor loop pays for.
"""

from __future__ import annotations

import pytest
import torch

from antibody_fast.dispatch import resolve_impl
from antibody_fast.ops import flat_ops as F

RHO = 0.1
ETA = 5.0
LAMBDA_REF = 0.05
MAX_NORM = 1.0


def lora_shapes(n_layers: int, r: int = 16, hidden: int = 4096, inter: int = 11008) -> list[tuple[int, int]]:
    per_layer = []
    for _ in ("q", "k", "v", "o"):
        per_layer += [(r, hidden), (hidden, r)]
    for _ in ("gate", "up"):
        per_layer += [(r, hidden), (inter, r)]
    per_layer += [(r, inter), (hidden, r)]  # down
    return per_layer * n_layers


class Buffers:
    """Flat fp32 buffers (params, backup, g_a, g_h, g_p, g_r) and their per-tensor views."""

    def __init__(self, shapes, device, dtype=torch.float32):
        self.shapes = shapes
        self.numel = sum(a * b for a, b in shapes)
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(scale):
            return (torch.randn(self.numel, generator=gen) * scale).to(device=device, dtype=dtype)

        self.params = rand(0.02)
        self.backup = torch.empty_like(self.params)
        self.g_a, self.g_h, self.g_p, self.g_r = rand(1e-3), rand(1e-3), rand(1e-3), rand(1e-3)
        self.scratch = [torch.empty_like(self.params) for _ in range(2)]
        self.names = [f"t{i}" for i in range(len(shapes))]

        self._views: dict[int, list[torch.Tensor]] = {}

    def views(self, flat):
        """Per-tensor views (built once: a real model already has its per-tensor parameters/grads)."""
        key = flat.data_ptr()
        if key not in self._views:
            out, off = [], 0
            for a, b in self.shapes:
                out.append(flat[off : off + a * b].view(a, b))
                off += a * b
            self._views[key] = out
        return self._views[key]


@pytest.fixture(scope="module")
def setup(bench_device, quick):
    n_layers = 8 if quick else 32
    shapes = lora_shapes(n_layers)
    bufs = Buffers(shapes, bench_device)
    shape_tag = {
        "model": "llama2-7b-lora-r16",
        "layers": n_layers,
        "tensors": len(shapes),
        "numel": bufs.numel,
    }
    return bufs, shape_tag


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def count_launches(fn, device) -> int:
    """CUDA: device kernels (+ memsets/copies) of one call; CPU: top-level operator calls of one call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm (Triton compilation, allocator)
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return sum(1 for e in events if e.cpu_parent is None and "::" in e.name)


# ------------------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------------------
def norm_loop(b: Buffers):
    grads = b.views(b.g_a)
    return torch.norm(torch.stack([g.norm(2) for g in grads]), 2)


def norm_foreach(b: Buffers):
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(b.views(b.g_a))))


def norm_ours(b: Buffers):
    return F.sq_norm(b.g_a)


def norm_floor(b: Buffers):
    return b.g_a.sum()  # one streaming read


def perturb_restore_loop(b: Buffers):
    params, grads = b.views(b.params), b.views(b.g_h)
    grad_norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
    scale = RHO / (grad_norm + 1e-7)
    backup = {}
    for name, p, g in zip(b.names, params, grads):
        backup[name] = p.data.clone()
        e_w = g * scale
        p.data.sub_(e_w)
    for name, p in zip(b.names, params):
        p.data.copy_(backup[name])


def perturb_restore_foreach(b: Buffers):
    params, grads, backup = b.views(b.params), b.views(b.g_h), b.views(b.backup)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = RHO / (norm + 1e-7)
    torch._foreach_copy_(backup, params)
    torch._foreach_sub_(params, torch._foreach_mul(grads, scale))
    torch._foreach_copy_(params, backup)


def perturb_restore_ours(b: Buffers):
    bk = F.perturb_(b.params, b.g_h, RHO, out=[b.backup])
    F.restore_(b.params, bk)


def perturb_restore_floor(b: Buffers):
    # read g (norm) | read theta + g, write backup + theta | read backup, write theta
    b.g_h.sum()
    b.backup.copy_(b.params)
    torch.add(b.params, b.g_h, out=b.scratch[0])
    b.scratch[0].copy_(b.backup)


def _lambda(dots):
    cos = dots[0] / (dots[1].sqrt() * dots[2].sqrt() + 1e-8)
    return torch.clamp(ETA - cos, min=0.0)


def step_loop(b: Buffers):
    ga, gh, gp, gr = (b.views(x) for x in (b.g_a, b.g_h, b.g_p, b.g_r))
    dot = aa = ss = 0.0
    for a, h, p in zip(ga, gh, gp):
        s = h - p
        dot = dot + (a * s).sum()
        aa = aa + (a * a).sum()
        ss = ss + (s * s).sum()
    lam = _lambda(torch.stack([dot, aa, ss]))
    for a, h, p, r in zip(ga, gh, gp, gr):
        a.add_(lam * (h - p)).add_(LAMBDA_REF * r)
    total = torch.norm(torch.stack([a.norm(2) for a in ga]), 2)
    coef = torch.clamp(MAX_NORM / (total + 1e-6), max=1.0)
    for a in ga:
        a.mul_(coef)
    return total


def step_foreach(b: Buffers):
    ga, gh, gp, gr = (b.views(x) for x in (b.g_a, b.g_h, b.g_p, b.g_r))
    gs = torch._foreach_sub(gh, gp)
    n_a = torch.stack(torch._foreach_norm(ga))
    n_s = torch.stack(torch._foreach_norm(gs))
    n_sum = torch.stack(torch._foreach_norm(torch._foreach_add(ga, gs)))
    aa, ss = n_a.square().sum(), n_s.square().sum()
    dot = (n_sum.square().sum() - aa - ss) / 2  # polarisation: no per-tensor dot in torch._foreach_*
    lam = _lambda(torch.stack([dot, aa, ss]))
    torch._foreach_mul_(gs, lam)
    torch._foreach_add_(ga, gs)
    torch._foreach_add_(ga, gr, alpha=LAMBDA_REF)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ga)))
    coef = torch.clamp(MAX_NORM / (total + 1e-6), max=1.0)
    torch._foreach_mul_(ga, coef)
    return total


def step_ours(b: Buffers):
    dots = F.grad_dots(b.g_a, b.g_h, b.g_p)
    lam = _lambda(dots)
    F.antibody_combine_(b.g_a, b.g_a, b.g_h, b.g_p, b.g_r, lam, LAMBDA_REF)
    return F.clip_(b.g_a, MAX_NORM)


def step_floor(b: Buffers):
    # dots: read a, h, p | combine: read a, h, p, r, write out | clip: read out, then read + write out
    b.g_a.sum(), b.g_h.sum(), b.g_p.sum()
    out = b.scratch[0]
    torch.addcmul(b.g_a, b.g_h, b.g_p, out=out)
    b.g_r.sum()
    out.sum()
    out.mul_(0.5)


CASES = {
    "norm": {
        "authors-loop": norm_loop,
        "torch-foreach": norm_foreach,
        "ours": norm_ours,
        "floor": norm_floor,
    },
    "perturb_restore": {
        "authors-loop": perturb_restore_loop,
        "torch-foreach": perturb_restore_foreach,
        "ours": perturb_restore_ours,
        "floor": perturb_restore_floor,
    },
    "align_vector_step": {
        "authors-loop": step_loop,
        "torch-foreach": step_foreach,
        "ours": step_ours,
        "floor": step_floor,
    },
}
# bytes each op must stream (fp32): reads + writes, in units of one buffer
TRAFFIC = {"norm": 1, "perturb_restore": 7, "align_vector_step": 11}


@pytest.mark.parametrize("provider", ["authors-loop", "torch-foreach", "ours", "floor"])
@pytest.mark.parametrize("op", list(CASES))
def bench_flat_ops(benchmark, setup, timed, tag, floors, bench_device, quick, op, provider):
    bufs, shape_tag = setup
    fn = CASES[op][provider]
    run = lambda: fn(bufs)
    launches = count_launches(run, bench_device)
    extra = {}
    if provider == "ours":
        extra["impl"] = resolve_impl(
            {"norm": "sq_norm", "perturb_restore": "perturb_", "align_vector_step": "grad_dots"}[op],
            "auto",
            bufs.params.device,
            bufs.params.dtype,
        )
        extra["floor_s"] = floors.seconds(bytes_moved=TRAFFIC[op] * bufs.numel * bufs.params.element_size())
    tag(
        benchmark,
        op=f"flat_{op}",
        provider=provider,
        mode="quick" if quick else "full",
        shape=shape_tag,
        dtype=bufs.params.dtype,
        device=bench_device,
        launches=launches,
        **extra,
    )
    timed(benchmark, run)
