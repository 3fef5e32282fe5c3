"""Training-step benchmarks: the lean steps against HF's plain SFT and the authors-style steps.

Providers, timed in one run on the same model configuration and the same batches:

* ``mode="finetune"`` group:
  ``ours`` = :func:`antibody_fast.weighted_step` (1 forward/backward + refusal continuation, fused loss);
  ``fused-sft`` = :func:`antibody_fast.sft_step` (plain SFT on the same fused loss: the fair baseline);
  ``hf-sft`` = :func:`antibody_fast.reference.reference_sft_step` (HF's own loss, logits materialised);
  ``authors`` = :func:`antibody_fast.reference.reference_finetune_step` (3 forwards + 1 backward);
  ``trl-head`` = the loss path of TRL's ``SFTTrainer`` (``add_fused_lm_head`` with SFT's outputs ``log_probs``,
  ``entropy``, ``is_top1``; ``model(..., fused_lm_head=True).loss``), backward, clip, AdamW step;
  ``trl-head-ours`` = the same after :func:`antibody_fast.integrations.trl.use_fused_head` (our op in TRL's
  slot). Both need TRL (skipped without it: the GPU image has none).
* ``mode="align"`` group:
  ``ours`` = :func:`antibody_fast.align_step` (4 forward/backward, in-place perturbation, fused vector ops);
  ``authors`` = :func:`antibody_fast.reference.reference_align_step` (5 forward/backward + a model copy).

Configurations (LoRA r=16 on q, k, v; AdamW; ragged prompts and answers, prompt-aligned batches):

* CPU (fp32): a "tiny" Llama that keeps the shape of the real cost: hidden 256, 4 layers, 4 heads (2 KV heads),
  MLP 688, **vocab 32000** (so the lm_head matters as it does at scale); batch 8, sequence 256 (prompts up to
  128 tokens, answers up to 128, refusals up to 32).
* GPU (bf16 weights, ``gpu`` marker): a ~1B Llama (Llama-3.2-1B shape: hidden 2048, 16 layers, 32 heads, 8 KV
  heads, MLP 8192, vocab 128256); batch 8, sequence 512 (prompts up to 256, answers up to 256).
* Quick mode (``ANTIBODY_FAST_BENCH_QUICK=1``): hidden 64, 2 layers, vocab 2048, batch 4, sequence 64.
* ``test_step_smollm2`` (CPU, fp32, not in quick mode): the shapes of the real-model demo, SmolLM2-135M-Instruct
  (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocab 49152, tied embeddings; random weights: the cost
  does not depend on their values); LoRA r=32 on q, k, v; batch 8, prompts up to 60 tokens, answers up to 60,
  refusals up to 24 (the demo's batches are ~8 x 108 with ~21-token refusals).

``extra_info``: ``op="step"``, ``provider``, ``mode``, ``device``, ``dtype``, ``shape``, ``tokens_per_step``
(real prompt + answer tokens of the batch(es) one step consumes) and ``peak_mem_bytes`` (one step, measured
outside the timed region). The last case prints the training-step target ratios:
weighted/sft, authors-FT/weighted, weighted/HF-SFT, authors-align/align and align/(4 x sft).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from antibody_fast.data import AlignCollator, FinetuneCollator
from antibody_fast.models import add_lora, tiny_llama
from antibody_fast.reference import reference_align_step, reference_finetune_step, reference_sft_step
from antibody_fast.steps import AlignConfig, AlignState, FinetuneConfig, align_step, sft_step, weighted_step


@dataclass(frozen=True)
class StepConfig:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    max_prompt: int
    max_answer: int
    max_refusal: int
    lora_r: int = 16
    tied: bool = False  # lm_head tied to the input embeddings (SmolLM2)


CPU = StepConfig("llama-h256-l4-v32000", 256, 4, 4, 2, 688, 32000, 8, 128, 128, 32)
GPU = StepConfig("llama-1b-v128256", 2048, 16, 32, 8, 8192, 128256, 8, 256, 256, 48)
QUICK = StepConfig("llama-h64-l2-v2048", 64, 2, 4, 2, 128, 2048, 4, 32, 32, 12, lora_r=8)
SMOLLM2 = StepConfig("smollm2-135m-shape", 576, 30, 9, 3, 1536, 49152, 8, 60, 60, 24, lora_r=32, tied=True)

_MEDIANS: dict[tuple[str, str, str], float] = {}
_FLOORS: dict[str, float] = {}


def flop_floor(model, ft) -> float:
    """The FLOP-count floor of ``weighted_step`` / ``sft_step`` on batch ``ft``: what the refusal view adds to
    plain SFT, counting matmul FLOPs only (attention scores and elementwise work left out).

    SFT: the trunk's forward and backward over every real token (LoRA on frozen weights: the backward computes
    input gradients only, about one forward), ``4 N T``, plus the lm_head on the answer rows, forward and the
    precomputed gradient, ``4 V H A``. The refusal view adds a no-grad forward over the refusal tokens, ``2 N R``,
    and their lm_head rows, ``2 V H R``. ``N``: trunk weights (embeddings and lm_head excluded); ``T``, ``A``,
    ``R``: real tokens, scored answer rows and refusal rows of the batch."""
    n = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "embed_tokens" not in name and "lm_head" not in name
    )
    head = model.get_output_embeddings().weight
    vh = head.shape[0] * head.shape[1]
    t = int(ft.attention_mask.sum())
    a = int((ft.labels != -100).sum())
    r = int(ft.refusal_mask.sum())
    return 1.0 + (2 * n * r + 2 * vh * r) / (4 * n * t + 4 * vh * a)


def _config(device: str, quick: bool) -> StepConfig:
    if quick:
        return QUICK
    return GPU if device == "cuda" else CPU


def _examples(cfg: StepConfig, n: int, seed: int, harmful: bool | None = None) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ex = {
            "prompt": [
                rng.randrange(3, cfg.vocab) for _ in range(rng.randint(cfg.max_prompt // 2, cfg.max_prompt))
            ],
            "response": [
                rng.randrange(3, cfg.vocab) for _ in range(rng.randint(cfg.max_answer // 2, cfg.max_answer))
            ],
            "index": seed * 1000 + i,
        }
        if harmful is not None:
            ex["is_harmful"] = harmful if harmful else i % 4 == 0
        out.append(ex)
    return out


def _pool(cfg: StepConfig) -> list[list[int]]:
    rng = random.Random(1234)
    return [
        [rng.randrange(3, cfg.vocab) for _ in range(rng.randint(cfg.max_refusal // 2, cfg.max_refusal))]
        for _ in range(16)
    ]


def _model(cfg: StepConfig, device: str, dtype: torch.dtype):
    model = tiny_llama(
        vocab_size=cfg.vocab,
        hidden=cfg.hidden,
        layers=cfg.layers,
        heads=cfg.heads,
        kv_heads=cfg.kv_heads,
        intermediate=cfg.intermediate,
        dtype=dtype,
        max_positions=4096,
    )
    if cfg.tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model = add_lora(model, r=cfg.lora_r, targets=("q_proj", "k_proj", "v_proj"), random_init=True)
    model.to(device)
    # LoRA adapters in fp32 even when the base weights are bf16 (the usual mixed-precision LoRA setup)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, opt


@pytest.fixture(scope="module")
def data(bench_device, quick):
    return _data(_config(bench_device, quick), bench_device)


def _data(cfg: StepConfig, bench_device: str):
    pool = _pool(cfg)
    ft = FinetuneCollator(refusals=pool, max_length=cfg.max_prompt + cfg.max_answer)(
        _examples(cfg, cfg.batch, seed=1, harmful=False)
    ).to(bench_device)
    ab = AlignCollator(refusals=pool, max_length=cfg.max_prompt + cfg.max_answer)(
        _examples(cfg, cfg.batch, seed=2), _examples(cfg, cfg.batch, seed=3, harmful=True)
    ).to(bench_device)
    return cfg, ft, ab


def _tokens(*batches) -> int:
    return int(sum(int(b.attention_mask.sum()) for b in batches))


def _amp(device: str):
    return torch.bfloat16 if device == "cuda" else None


def _cases():
    return [
        ("finetune", "ours"),
        ("finetune", "fused-sft"),
        ("finetune", "hf-sft"),
        ("finetune", "authors"),
        ("finetune", "trl-head"),
        ("finetune", "trl-head-ours"),
        ("align", "ours"),
        ("align", "authors"),
    ]


def _step_fn(mode: str, provider: str, model, opt, ft, ab, device: str):
    amp = _amp(device)
    if provider.startswith("trl-head"):
        return _trl_step(provider, model, opt, ft, device, amp), _tokens(ft)
    if mode == "finetune":
        if provider == "ours":
            cfg = FinetuneConfig(amp_dtype=amp)
            return lambda: weighted_step(model, ft, opt, cfg), _tokens(ft)
        if provider == "fused-sft":
            cfg = FinetuneConfig(amp_dtype=amp)
            lm = ft.answer_view()
            return lambda: sft_step(model, lm, opt, cfg), _tokens(ft)
        lm = ft.answer_view()
        if provider == "hf-sft":
            fn = lambda: reference_sft_step(model, lm, opt)
        else:
            fn = lambda: reference_finetune_step(model, ft, opt)
        if amp is not None:
            inner = fn
            fn = lambda: _autocast_call(inner, device, amp)
        return fn, _tokens(ft)
    if provider == "ours":
        state = AlignState()
        cfg = AlignConfig(amp_dtype=amp)
        return lambda: align_step(model, ab, opt, state, cfg), _tokens(ab.align, ab.harmful, ab.refusal)
    ref_state: dict = {}
    fn = lambda: reference_align_step(model, ab, opt, ref_state)
    if amp is not None:
        inner = fn
        fn = lambda: _autocast_call(inner, device, amp)
    return fn, _tokens(ab.align, ab.harmful, ab.refusal)


def _trl_step(provider: str, model, opt, ft, device: str, amp):
    """One step through TRL's fused-head slot (TRL's kernel, or ours with ``trl-head-ours``)."""
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        pytest.skip(f"{provider}: TRL is not installed (optional provider)")
    from antibody_fast.integrations.trl_head import use_fused_head

    add_fused_lm_head(
        model.get_base_model(), outputs=("log_probs", "entropy", "is_top1")
    )  # as SFTTrainer does
    if provider == "trl-head-ours":
        use_fused_head(model)
    lm = ft.answer_view()
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = model(
                input_ids=lm.input_ids, attention_mask=lm.attention_mask, position_ids=lm.position_ids,
                labels=lm.labels, fused_lm_head=True,
            )  # fmt: skip
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return out.loss.detach()

    return step


def _autocast_call(fn, device, dtype):
    with torch.autocast(device_type=device, dtype=dtype):
        return fn()


@pytest.mark.parametrize("mode,provider", _cases())
def test_step(benchmark, mode, provider, data, bench_device, bench_dtype, quick, timed, peak_memory, tag):
    _bench_step(benchmark, mode, provider, data, bench_device, bench_dtype, quick, timed, peak_memory, tag)


_SMOLLM2_DATA: dict = {}


@pytest.mark.cpu_only
@pytest.mark.parametrize("mode,provider", _cases())
def test_step_smollm2(benchmark, mode, provider, bench_device, bench_dtype, quick, timed, peak_memory, tag):
    """The same providers at the real-model demo's shapes (SmolLM2-135M, tied embeddings); CPU only."""
    if quick:
        pytest.skip("SmolLM2 shapes: not in quick mode")
    if "cpu" not in _SMOLLM2_DATA:
        _SMOLLM2_DATA["cpu"] = _data(SMOLLM2, bench_device)
    _bench_step(
        benchmark,
        mode,
        provider,
        _SMOLLM2_DATA["cpu"],
        bench_device,
        bench_dtype,
        quick,
        timed,
        peak_memory,
        tag,
    )


def _bench_step(benchmark, mode, provider, data, bench_device, bench_dtype, quick, timed, peak_memory, tag):
    cfg, ft, ab = data
    model, opt = _model(cfg, bench_device, bench_dtype)
    fn, tokens = _step_fn(mode, provider, model, opt, ft, ab, bench_device)
    fn()  # first call: packing of the flat buffer, kernel compilation / extension load
    peak = peak_memory(fn)
    extra = {}
    if mode == "finetune" and provider == "ours":
        extra["flop_floor_vs_sft"] = _FLOORS[cfg.name] = round(flop_floor(model, ft), 4)
    shape = {
        "config": cfg.name,
        "batch": cfg.batch,
        "seq": ft.input_ids.shape[1] if mode == "finetune" else ab.harmful.input_ids.shape[1],
        "lora_r": cfg.lora_r,
    }
    tag(
        benchmark,
        op="step",
        provider=provider,
        mode=mode,
        shape=shape,
        dtype=bench_dtype,
        tokens_per_step=tokens,
        peak_mem_bytes=peak,
        **extra,
    )
    rounds = None
    if not quick and bench_device == "cpu" and (cfg.tied or (provider == "authors" and mode == "align")):
        rounds = 5  # ~10 s per authors-style align step on the 2-core development CPU; SmolLM2 steps ~2-15 s
    timed(benchmark, fn, rounds=rounds, warmup_rounds=1 if rounds else None)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        _MEDIANS[(cfg.name, mode, provider)] = stats.stats.median


def test_report_ratios(bench_device, quick):
    """Prints the training-step target ratios from the medians measured above (no assertion: a report)."""
    for name in (_config(bench_device, quick).name, SMOLLM2.name):
        _report(name, {k[1:]: v for k, v in _MEDIANS.items() if k[0] == name}, bench_device)


def _report(name: str, m: dict, bench_device: str) -> None:
    need = [("finetune", "ours"), ("finetune", "fused-sft"), ("finetune", "hf-sft"), ("finetune", "authors")]
    if not all(k in m for k in need):
        print(f"\n{name}: the step benchmarks did not all run")
        return
    lines = [
        f"device={bench_device} config={name}",
        f"weighted_step / sft_step          = {m['finetune', 'ours'] / m['finetune', 'fused-sft']:.3f}"
        f"  (FLOP floor {_FLOORS.get(name, float('nan')):.3f})",
        f"authors FT / weighted_step        = {m['finetune', 'authors'] / m['finetune', 'ours']:.3f}",
        f"weighted_step / HF SFT            = {m['finetune', 'ours'] / m['finetune', 'hf-sft']:.3f}",
        f"sft_step / HF SFT                 = {m['finetune', 'fused-sft'] / m['finetune', 'hf-sft']:.3f}",
    ]
    if ("finetune", "trl-head") in m and ("finetune", "trl-head-ours") in m:
        lines += [
            f"TRL head / TRL head with ours     = {m['finetune', 'trl-head'] / m['finetune', 'trl-head-ours']:.3f}",
            f"weighted_step / TRL head          = {m['finetune', 'ours'] / m['finetune', 'trl-head']:.3f}",
        ]
    if ("align", "ours") in m and ("align", "authors") in m:
        lines += [
            f"authors align / align_step        = {m['align', 'authors'] / m['align', 'ours']:.3f}",
            f"align_step / (4 x sft_step)       = {m['align', 'ours'] / (4 * m['finetune', 'fused-sft']):.3f}",
        ]
    print("\n" + "\n".join(lines))
