"""Fused per-sequence log-likelihood: ``linear_sequence_logprob`` against the usual routes.

Workload: packed rows ``hidden [N, H]`` of B sequences (T rows each), the first quarter of every sequence
ignored (a prompt), lm_head ``weight [V, H]`` frozen (the LoRA case), ``hidden`` requiring grad.

* CPU, fp32: N = B*T = 2048 (16 x 128), H = 256, V = 32000 (quick mode, ``ANTIBODY_FAST_BENCH_QUICK=1``:
  N = 256, H = 64, V = 4000).
* GPU (marked ``gpu``), bf16: N = 8192 (8 x 1024), H = 4096, V = 32000 and V = 128256.

Modes: ``fwd`` (no-grad forward: scoring), ``bwd`` (backward only, graph built in the untimed setup),
``full`` (forward + backward).

Providers:

* ``ours``: :func:`antibody_fast.ops.sequence_logprob.linear_sequence_logprob` (``impl="auto"``: C++ on CPU,
  Triton on CUDA) with the default frozen-weight strategy (``precompute``);
* ``ours-recompute``: the same with ``ANTIBODY_FAST_FROZEN_STRATEGY=recompute`` (backward recomputes the
  logit tiles), to compare the two strategies on the device;
* ``ours-token-stats``: :func:`~antibody_fast.ops.sequence_logprob.linear_token_logprob` with ``stats=True``
  (per-token log-probs plus entropy and top-1 flag, what :func:`antibody_fast.integrations.trl.use_fused_head`
  computes in TRL's slot), summed per sequence;
* ``torch-reference``: materialised ``hidden @ W.T`` -> ``log_softmax`` -> gather -> segment sum;
* ``torch-compile-chunked``: ``torch.compile`` of the chunked pure-torch version;
* ``liger``: Liger-Kernel's fused linear cross-entropy (``reduction="none"``), CUDA only, when installed;
* ``cce``: cut-cross-entropy's ``linear_cross_entropy`` (``reduction="none"``), CUDA only, when installed;
* ``trl-chunked``: TRL's fused LM head kernel (``trl.kernels.ChunkedLogProbFunction``, what ``SFTTrainer``
  computes its loss with since TRL 1.0: cuBLAS tiles folded by Triton on GPU, by torch ops elsewhere) on the
  scored rows, log-probs only, TRL's own chunk size; when TRL is installed; ``trl-chunked-stats``: the same
  with ``entropy`` and ``is_top1``, the outputs ``SFTTrainer`` asks for (the match of ``ours-token-stats``);
* ``floor``: the unavoidable matmuls on the scored rows alone: ``fwd`` = ``h_s @ W.T``; ``bwd`` =
  ``(p - onehot) @ W``; ``full`` = both.

Every case records ``peak_mem_bytes`` (tensor memory beyond the inputs) in ``extra_info``.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import pytest
import torch

from antibody_fast.dispatch import resolve_impl

slp = importlib.import_module("antibody_fast.ops.sequence_logprob")

PROVIDERS = [
    "ours",
    "ours-recompute",
    "ours-token-stats",
    "torch-reference",
    "torch-compile-chunked",
    "trl-chunked",
    "trl-chunked-stats",
    "liger",
    "cce",
    "floor",
]
MODES = ["fwd", "bwd", "full"]


class Workload:
    def __init__(self, B, T, H, V, dtype, device):
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.B, self.T, self.H, self.V = B, T, H, V
        n = B * T
        self.hidden = (torch.randn(n, H, generator=gen) * 0.5).to(device, dtype)
        self.weight = (torch.randn(V, H, generator=gen) / H**0.5).to(device, dtype)
        labels = torch.randint(0, V, (B, T), generator=gen)
        labels[:, : T // 4] = -100  # a prompt: a quarter of the positions
        self.labels = labels.reshape(-1).to(device)
        self.seq_ids = torch.arange(B).repeat_interleave(T).to(device)
        keep = self.labels != -100
        self.h_scored = self.hidden[keep].contiguous()
        self.n_scored = int(keep.sum())
        self.shape = {"B": B, "T": T, "N": n, "scored_rows": self.n_scored, "H": H, "V": V}


def _segment_logprob(token_loss, w: Workload):
    return -torch.zeros(w.B, dtype=torch.float32, device=token_loss.device).index_add(
        0, w.seq_ids, token_loss.float()
    )


@contextlib.contextmanager
def _env(key, value):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _provider_fn(provider: str, w: Workload, device: str):
    """fn(hidden) -> [B] logprob (differentiable w.r.t. hidden)."""
    if provider in ("ours", "ours-recompute"):
        strategy = "precompute" if provider == "ours" else "recompute"

        def fn(h):
            with _env("ANTIBODY_FAST_FROZEN_STRATEGY", strategy):
                return slp.linear_sequence_logprob(
                    h, w.weight, w.labels, seq_ids=w.seq_ids, num_seqs=w.B, shift=False
                ).logprob

        return fn
    if provider == "ours-token-stats":

        def fn(h):
            out = slp.linear_token_logprob(h, w.weight, w.labels, stats=True)
            return torch.zeros(w.B, dtype=torch.float32, device=h.device).index_add(
                0, w.seq_ids, out.log_probs
            )

        return fn
    if provider == "torch-reference":
        return lambda h: (
            slp.linear_sequence_logprob_reference(
                h, w.weight, w.labels, seq_ids=w.seq_ids, num_seqs=w.B, shift=False
            ).logprob
        )
    if provider == "torch-compile-chunked":
        compiled = torch.compile(slp.linear_sequence_logprob_chunked_reference)
        return lambda h: (
            compiled(
                h.view(w.B, w.T, w.H), w.weight, w.labels.view(w.B, w.T), shift=False, chunk_rows=1024
            ).logprob
        )
    if provider in ("trl-chunked", "trl-chunked-stats"):
        try:
            from trl.kernels import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
        except ImportError:
            pytest.skip("trl-chunked: TRL is not installed (optional provider)")
        keep = w.labels != -100
        targets, seq_ids = w.labels[keep], w.seq_ids[keep]
        extra = ("entropy", "is_top1") if provider == "trl-chunked-stats" else ()

        def fn(h):
            # as TRL's fused head: compact the scored rows, per-token log-probs, then our per-sequence sum
            logp = ChunkedLogProbFunction.apply(
                h[keep], w.weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, extra
            )[0]
            return torch.zeros(w.B, dtype=torch.float32, device=h.device).index_add(0, seq_ids, logp.float())

        return fn
    if provider == "liger":
        if device != "cuda":
            pytest.skip("liger: Liger-Kernel runs on CUDA only")
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            pytest.skip("liger: Liger-Kernel is not installed (optional provider)")
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda h: _segment_logprob(loss(w.weight, h, w.labels), w)
    if provider == "cce":
        if device != "cuda":
            pytest.skip("cce: cut-cross-entropy runs on CUDA only")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            pytest.skip("cce: cut-cross-entropy is not installed (optional provider)")
        return lambda h: _segment_logprob(linear_cross_entropy(h, w.weight, w.labels, reduction="none"), w)
    raise ValueError(provider)


def _floor_fns(w: Workload, mode: str):
    z = torch.empty(w.n_scored, w.V, device=w.hidden.device, dtype=w.hidden.dtype)
    d = torch.empty(w.n_scored, w.H, device=w.hidden.device, dtype=w.hidden.dtype)

    def fwd():
        torch.mm(w.h_scored, w.weight.t(), out=z)

    def bwd():
        torch.mm(z, w.weight, out=d)

    def full():
        fwd()
        bwd()

    return {"fwd": fwd, "bwd": bwd, "full": full}[mode]


def _run_case(benchmark, timed, tag, peak_memory, bench_device, w: Workload, provider, mode, quick):
    info = dict(
        op="linear_sequence_logprob", provider=provider, mode=mode, shape=w.shape, dtype=w.hidden.dtype
    )
    if provider == "floor":
        fn = _floor_fns(w, mode)
        info["peak_mem_bytes"] = 0  # buffers preallocated: the floor is a time, not a memory figure
        info["note"] = "matmuls on the scored rows only"
        tag(benchmark, **info)
        timed(benchmark, fn)
        return
    f = _provider_fn(provider, w, bench_device)
    if provider.startswith("ours"):
        info["impl"] = resolve_impl("linear_sequence_logprob", "auto", w.hidden.device, w.hidden.dtype)
        info["ours"] = provider == "ours"
    leaf = w.hidden.detach().clone()

    def fresh():
        return leaf.detach().requires_grad_(True)

    if mode == "fwd":

        def run():
            with torch.no_grad():
                return f(leaf)

        setup = None
    elif mode == "full":

        def run():
            h = fresh()
            f(h).sum().backward()
            return h.grad

        setup = None
    else:  # bwd: the forward (and its graph) is built in the untimed setup

        def setup():
            h = fresh()
            return (f(h).sum(), h), {}

        def run(loss, h):
            loss.backward()
            return h.grad

    # warm-up (compilation) and peak memory outside the timed region
    if setup is None:
        run()
        info["peak_mem_bytes"] = peak_memory(run)
    else:
        args, _ = setup()
        run(*args)
        args, _ = setup()
        info["peak_mem_bytes"] = peak_memory(lambda: run(*args))
    tag(benchmark, **info)
    timed(benchmark, run, setup=setup)


@pytest.fixture(scope="module")
def cpu_workload(bench_device, quick):
    if quick:
        return Workload(4, 64, 64, 4000, torch.float32, bench_device)
    return Workload(16, 128, 256, 32000, torch.float32, bench_device)


@pytest.mark.cpu_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_linear_sequence_logprob_cpu(
    benchmark, cpu_workload, timed, tag, peak_memory, bench_device, quick, provider, mode
):
    if provider in ("liger", "cce"):
        pytest.skip(f"{provider}: CUDA-only provider")
    _run_case(benchmark, timed, tag, peak_memory, bench_device, cpu_workload, provider, mode, quick)


_GPU_WORKLOADS: dict = {}


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 128256])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_linear_sequence_logprob_gpu(
    benchmark, timed, tag, peak_memory, bench_device, quick, provider, mode, vocab
):
    key = (vocab, quick)
    if key not in _GPU_WORKLOADS:
        _GPU_WORKLOADS.clear()
        B, T, H = (2, 512, 1024) if quick else (8, 1024, 4096)
        _GPU_WORKLOADS[key] = Workload(B, T, H, vocab, torch.bfloat16, bench_device)
    _run_case(benchmark, timed, tag, peak_memory, bench_device, _GPU_WORKLOADS[key], provider, mode, quick)
