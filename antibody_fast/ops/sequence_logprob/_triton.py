"""Triton launchers of the per-sequence log-likelihood ops (the ``@triton.jit`` kernels:
``kernels/sequence_logprob.py``, imported lazily: ``TRITON_INTERPRET`` must be set before they are defined).

The four stages :func:`linear_sequence_logprob_fwd`, :func:`linear_sequence_logprob_bwd`,
:func:`sequence_logprob_fwd` and :func:`sequence_logprob_bwd` take the same arguments as their torch twins
(``_torch.py``). The launch configurations here (``LINEAR_CONFIGS``, ``COMBINE_BLOCKS``, :func:`logits_block`,
the chunk widths) are public because ``antibody_fast.gpu_compile`` compiles exactly what they can launch.
"""

import functools

import torch

from ._torch import LinearGradParams, LinearParams, LogitsGradParams, LogitsParams


def _kernels():
    from ...kernels import sequence_logprob as k  # lazy: TRITON_INTERPRET must be set before definition

    return k


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------------------------------
# Triton schedule of the fused lm_head op (GPU-shaped; kernels: kernels/sequence_logprob.py)
# ------------------------------------------------------------------------------------------------------------
#
# Notation: N scored rows, V vocabulary, H hidden size; one "matmul" = 2*N*V*H FLOPs.
#
# Forward (2 launches): ``_linear_fwd_kernel`` on a 2-D grid (row tiles x vocabulary chunks) writes per-chunk
#   (max, sum-exp) partials ``[n_chunks, N]`` and the label logit; ``_lse_combine_kernel`` merges them into
#   LSE and log p. The chunk width is picked so that the grid has at least 4 programs per SM
#   (``fwd_chunk``): at N = 4096, BLOCK_M = 128 that is 32 row tiles x 18 chunks = 576 programs on a
#   132-SM H100 (V = 32000: 1792-wide chunks; V = 128256: 7424-wide). Programs are ordered row tile first,
#   so the programs in flight share a vocabulary chunk and W is read from HBM about once.
#   1 matmul.
# Backward, per vocabulary chunk ``[v_lo, v_hi)`` (3 launches each): ``_linear_dz_kernel`` recomputes the
#   logit tile and stores dz = g * (onehot - p) * dcap into a bounded buffer ``[rows, chunk]`` (input dtype;
#   at most DZ_BUDGET bytes, so logits are never materialised whole); ``_linear_dh_kernel`` adds
#   dz @ W[chunk] into dH, each program owning a (row tile, hidden tile); ``_linear_dw_kernel`` computes
#   dW[chunk] = dz^T @ H, each program owning a (vocabulary tile, hidden tile) of dW and looping over every
#   scored row (plus db). dW is therefore written exactly once per element, in the weight's dtype, with no
#   atomics and no split-K buffer: the row loop is the reduction. Chosen over split-K because the chunked dz
#   buffer already gives every dW tile its whole reduction, and the grid is wide enough without splitting
#   (V = 32000, H = 4096, 128 x 128 tiles: 8000 programs). 1 matmul (recompute) + 1 (dH) + 1 (dW, when the
#   weight trains).
# Autotuning (CUDA only): each kernel is wrapped in ``triton.autotune`` over the few configurations of
#   ``LINEAR_CONFIGS`` (keyed on the sizes and dtypes); the dH kernel's accumulator is restored between trial
#   runs. Under the interpreter (``TRITON_INTERPRET=1``) one fixed small configuration runs, and the chunks
#   are narrow (_INTERP_CHUNK) so that the tests cross chunk boundaries.
#
# Frozen lm_head on CUDA (FROZEN_STRATEGY["cuda"] = "recompute"), by FLOP count. The 2-D forward splits each
#   row over vocabulary chunks, so p = exp(z - LSE) is known only after the combine: a precomputed dH needs
#   a second pass over the logits in the forward (dz + dH kernels, the same as the backward). Precompute:
#   forward 1 + 2 = 3 matmuls, backward 0 (a scale of the stored [N, H] float32 dH). Recompute: forward 1,
#   backward 2. Equal totals (3 matmuls), so recompute wins on everything else: a forward without a backward
#   (evaluation with grad enabled, a refusal-only call) costs 1 matmul instead of 3, and no [N, H] float32
#   buffer lives from the forward to the backward. (On CPU the C++ kernel sees whole rows per block, so its
#   precompute costs 2 matmuls against 3 and wins: see FROZEN_STRATEGY's comment.)

# One configuration: (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages). The roles of the blocks:
#   fwd, dz: BLOCK_M rows x BLOCK_V vocabulary outputs, reduction over H in BLOCK_K steps;
#   dh:      BLOCK_M rows x BLOCK_K hidden outputs, reduction over the chunk in BLOCK_V steps;
#   dw:      BLOCK_V vocabulary x BLOCK_K hidden outputs, reduction over the rows in BLOCK_M steps.
# "tc": float16 / bfloat16 on CUDA (tensor cores, float32 accumulation); "f32": float32 on CUDA (IEEE fp32
# dots: no TF32); "interp": the interpreter (fp32 dots, smallest legal tiles).
LINEAR_CONFIGS = {
    "fwd": {
        # (128, 128, 64, 8, 3) spilled 4 B on sm_90 with bias + softcap; 2 stages: 254 registers, no spill
        "tc": [(128, 128, 64, 8, 2), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3)],
        # fp32 tiles 64 wide in the vocabulary spilled 4-12 B with a bias (sm_80 under triton 3.6, sm_90 under
        # 3.9); 32-wide tiles compile without spills on both architectures under both versions
        "f32": [(64, 32, 32, 4, 2), (32, 32, 32, 4, 2)],
        "interp": [(16, 32, 16, 4, 1)],
    },
    "dz": {
        # (128, 128, 64, 8, 3) spilled 44-152 B under triton 3.6 with bias + softcap (2 stages or BLOCK_K 32 too);
        # a 128 x 64 tile does not spill (at most 199 registers)
        "tc": [(128, 64, 64, 8, 3), (64, 128, 64, 8, 4), (128, 64, 64, 4, 3)],
        "f32": [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)],
        "interp": [(16, 32, 16, 4, 1)],
    },
    "dh": {
        "tc": [(128, 64, 128, 8, 3), (64, 64, 128, 4, 4), (64, 64, 256, 8, 3)],
        "f32": [(32, 32, 64, 4, 3), (64, 32, 64, 4, 2)],
        "interp": [(16, 16, 32, 4, 1)],
    },
    "dw": {
        "tc": [(64, 128, 128, 8, 3), (64, 64, 128, 4, 4), (64, 64, 256, 8, 3)],
        "f32": [(32, 64, 32, 8, 2), (32, 32, 32, 4, 2)],
        "interp": [(16, 32, 16, 4, 1)],
    },
}
_LINEAR_KERNELS = {
    "fwd": "_linear_fwd_kernel",
    "dz": "_linear_dz_kernel",
    "dh": "_linear_dh_kernel",
    "dw": "_linear_dw_kernel",
}
_AUTOTUNE_KEYS = {
    "fwd": ["K", "V", "v_chunk"],
    "dz": ["K", "stride_dz"],
    "dh": ["K", "stride_dz"],
    "dw": ["K", "stride_dz"],
}
COMBINE_BLOCKS = {"cuda": (64, 32, 4), "cpu": (16, 4, 4)}  # (BLOCK_R, BLOCK_C, num_warps)
_INTERP_CHUNK = 64  # vocabulary columns per chunk under the interpreter (tests use V = 100: 2 chunks)
DZ_BUDGET = 256 << 20  # bytes of the backward's dz buffer on CUDA
_PROGRAMS_PER_SM = 4  # forward grid target


def config_kind(dtype: torch.dtype, device: torch.device) -> str:
    if device.type == "cpu":
        return "interp"
    return "f32" if dtype == torch.float32 else "tc"


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _autotuned(stage: str, kind: str):
    """The ``triton.autotune`` wrapper of one lm_head kernel over ``LINEAR_CONFIGS[stage][kind]`` (CUDA)."""
    import triton

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bm, bv, bk, w, st in LINEAR_CONFIGS[stage][kind]
    ]
    extra = {"restore_value": ["DH_ptr"]} if stage == "dh" else {}
    kernel = getattr(_kernels(), _LINEAR_KERNELS[stage])
    return triton.autotune(configs=configs, key=_AUTOTUNE_KEYS[stage], **extra)(kernel)


def _launch(stage: str, kind: str, grid, *args, **flags) -> None:
    """Launch an lm_head kernel: autotuned on CUDA, the fixed interpreter config on CPU. ``grid(meta)`` gets
    the chosen blocks (``meta["BLOCK_M"]`` ...)."""
    if kind == "interp":
        bm, bv, bk, w, st = LINEAR_CONFIGS[stage][kind][0]
        meta = {"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}
        kernel = getattr(_kernels(), _LINEAR_KERNELS[stage])
        kernel[grid(meta)](*args, **flags, **meta, num_warps=w, num_stages=st)
    else:
        _autotuned(stage, kind)[grid](*args, **flags)


def _round_down(x: int, m: int) -> int:
    return max(m, (x // m) * m)


def fwd_chunk(N: int, V: int, device: torch.device) -> int:
    """Vocabulary columns per forward program: enough chunks for _PROGRAMS_PER_SM programs per SM with the
    largest row tile (a multiple of 256, the widest BLOCK_V); _INTERP_CHUNK under the interpreter."""
    if device.type == "cpu":
        return _INTERP_CHUNK
    row_tiles = _cdiv(N, max(c[0] for c in LINEAR_CONFIGS["fwd"]["tc"] + LINEAR_CONFIGS["fwd"]["f32"]))
    want = _cdiv(_PROGRAMS_PER_SM * sm_count(device), max(row_tiles, 1))
    return _round_down(_cdiv(V, want), 256)


def bwd_chunk(rows: int, V: int, elt: int, device: torch.device) -> int:
    """Vocabulary columns per backward chunk: the dz buffer ``[rows, chunk]`` stays within DZ_BUDGET."""
    if device.type == "cpu":
        return _INTERP_CHUNK
    return min(_round_down(DZ_BUDGET // max(rows * elt, 1), 256), _cdiv(V, 256) * 256)


def _sorted_rows(sel: torch.Tensor, grad_first: torch.Tensor | None = None):
    """(perm [N] int64 with the selected rows first (grad rows first among them), count [1] int32), no sync."""
    key = (~sel).to(torch.int8) * 2
    if grad_first is not None:
        key = key + (sel & ~grad_first).to(torch.int8)
    perm = torch.argsort(key, stable=True)
    return perm, sel.sum().to(torch.int32).reshape(1)


def _linear_grads(hidden, weight, bias, targets, seq_ids, lse, g, perm, n_sel, rows, softcap, dh, dw, db):
    """Chunked backward: for each vocabulary chunk, dz (bounded buffer), then dH += dz @ W[chunk] into ``dh``
    (float32, indexed by row), dW[chunk] = dz^T @ H into ``dw`` (weight dtype) and db[chunk] into ``db``
    (float32); ``dw`` / ``db`` may be None. ``rows``: an upper bound of the selected count (grid size)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    kind = config_kind(hidden.dtype, dev)
    dot_f32 = kind != "tc"
    dz_dtype = torch.float32 if dot_f32 else hidden.dtype
    chunk = bwd_chunk(rows, V, torch.finfo(dz_dtype).bits // 8, dev)
    dz = torch.empty(rows, chunk, dtype=dz_dtype, device=dev)
    b_arg = bias if bias is not None else hidden
    sc = float(softcap) if softcap is not None else 1.0
    need_dw, need_db = dw is not None, db is not None
    dw_arg = dw if need_dw else dz
    db_arg = db if need_db else lse
    for v_lo in range(0, V, chunk):
        v_hi = min(v_lo + chunk, V)
        width = v_hi - v_lo
        _launch(
            "dz", kind, lambda m, w=width: (_cdiv(rows, m["BLOCK_M"]), _cdiv(w, m["BLOCK_V"])),
            hidden, weight, b_arg, targets, seq_ids, perm, n_sel, lse, g, dz, H, v_lo, v_hi,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0), sc,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, DOT_F32=dot_f32,
        )  # fmt: skip
        if dh is not None:
            _launch(
                "dh", kind, lambda m: (_cdiv(rows, m["BLOCK_M"]), _cdiv(H, m["BLOCK_K"])),
                dz, weight, perm, n_sel, dh, H, v_lo, v_hi, dz.stride(0), weight.stride(0), weight.stride(1),
                dh.stride(0), DOT_F32=dot_f32,
            )  # fmt: skip
        if need_dw or need_db:
            _launch(
                "dw", kind, lambda m, w=width: (_cdiv(w, m["BLOCK_V"]), _cdiv(H, m["BLOCK_K"]) if need_dw else 1),
                dz, hidden, perm, n_sel, dw_arg, db_arg, H, v_lo, v_hi, dz.stride(0), hidden.stride(0),
                hidden.stride(1), dw.stride(0) if need_dw else 0, NEED_DW=need_dw, NEED_DB=need_db,
                DOT_F32=dot_f32,
            )  # fmt: skip


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a copy when its data pointer is not 16-byte aligned (a view with an offset): the kernels
    are compiled and checked for aligned operands (antibody_fast/gpu_compile.py). No host sync."""
    if t is None or t.device.type == "cpu" or t.data_ptr() % 16 == 0:
        return t
    return t.clone()


def linear_sequence_logprob_fwd(hidden, weight, bias, targets, seq_ids, p: LinearParams):
    """``(logprob [S], num_tokens [S], lse [N], dh [num_grad_rows or 0, H], entropy [N or 0], top1 [N or 0]
    bool)`` (float32), 2 launches (+ the dz / dH pass for ``mode="precompute"``)."""
    S, ng, softcap, ignore_index, mode = p.num_seqs, p.num_grad_rows, p.softcap, p.ignore_index, p.mode
    hidden, weight, bias = _aligned(hidden), _aligned(weight), _aligned(bias)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    logprob = torch.zeros(S, dtype=f32, device=dev)
    lse = torch.zeros(N, dtype=f32, device=dev)
    dh = torch.zeros(ng if mode == "precompute" else 0, H, dtype=f32, device=dev)
    stats = p.row_stats
    entropy = torch.zeros(N if stats else 0, dtype=f32, device=dev)
    top1 = torch.zeros(N if stats else 0, dtype=torch.int8, device=dev)
    valid = targets != ignore_index
    num_tokens = torch.zeros(S, dtype=torch.long, device=dev).index_add_(0, seq_ids, valid.long())
    if N == 0 or V == 0:
        return logprob, num_tokens, lse, dh, entropy, top1.view(torch.bool)
    k = _kernels()
    grad_row = torch.arange(N, device=dev) < ng
    perm, n_valid = _sorted_rows(valid, grad_row)
    kind = config_kind(hidden.dtype, dev)
    chunk = fwd_chunk(N, V, dev)
    n_chunks = _cdiv(V, chunk)
    n_pad = _cdiv(N, 16) * 16  # partial rows padded: the stride stays divisible by 16 (one specialization)
    part_m = torch.empty(n_chunks, n_pad, dtype=f32, device=dev)
    part_l = torch.empty(n_chunks, n_pad, dtype=f32, device=dev)
    part_t = torch.empty(n_chunks, n_pad, dtype=f32, device=dev) if stats else part_l  # unused without stats
    z_t = torch.empty(N, dtype=f32, device=dev)
    b_arg = bias if bias is not None else hidden
    sc = float(softcap) if softcap is not None else 1.0
    _launch(
        "fwd", kind, lambda m: (_cdiv(N, m["BLOCK_M"]), n_chunks),
        hidden, weight, b_arg, targets, perm, n_valid, part_m, part_l, part_t, z_t, H, V, chunk,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), part_m.stride(0), sc,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, DOT_F32=kind != "tc", STATS=stats,
    )  # fmt: skip
    BR, BC, warps = COMBINE_BLOCKS["cpu" if dev.type == "cpu" else "cuda"]
    k._lse_combine_kernel[(_cdiv(N, BR),)](
        part_m, part_l, part_t, z_t, targets, seq_ids, perm, n_valid, lse, logprob,
        entropy if stats else lse, top1 if stats else z_t, n_chunks, part_m.stride(0), V,
        STATS=stats, BLOCK_R=BR, BLOCK_C=BC, num_warps=warps,
    )  # fmt: skip
    if mode == "precompute" and ng > 0:
        # dlogp/dh of every grad row: the backward's dz / dH pass with g = 1 (see the schedule notes above)
        n_grad = (valid & grad_row).sum().to(torch.int32).reshape(1)
        ones = torch.ones(max(S, 1), dtype=f32, device=dev)
        _linear_grads(
            hidden, weight, bias, targets, seq_ids, lse, ones, perm, n_grad, ng, softcap, dh, None, None
        )
    return logprob, num_tokens, lse, dh, entropy, top1.view(torch.bool)


def linear_sequence_logprob_bwd(grad, hidden, weight, bias, targets, seq_ids, lse, p: LinearGradParams):
    """``(dh [N, H] or [0], dw [V, H] or [0], db [V] or [0])``: the chunked backward of the schedule above."""
    ng, softcap, ignore_index = p.num_grad_rows, p.softcap, p.ignore_index
    nh, nw, nb = p.need_dh, p.need_dw, p.need_db
    hidden, weight, bias = _aligned(hidden), _aligned(weight), _aligned(bias)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    nb = nb and bias is not None
    dh = torch.zeros(N if nh else 0, H, dtype=f32, device=dev)
    live = N > 0 and V > 0 and ng > 0 and (nh or nw or nb)
    # dW is written once per element by the kernels (weight dtype); zeros when nothing runs
    dw = (torch.empty if live else torch.zeros)(V if nw else 0, H, dtype=weight.dtype, device=dev)
    db = torch.zeros(V if nb else 0, dtype=f32, device=dev)
    if live:
        sel = (targets != ignore_index) & (torch.arange(N, device=dev) < ng)
        perm, n_sel = _sorted_rows(sel)
        g = grad.to(f32).contiguous()
        _linear_grads(
            hidden, weight, bias, targets, seq_ids, lse, g, perm, n_sel, ng, softcap,
            dh if nh else None, dw if nw else None, db if nb else None,
        )  # fmt: skip
    return (  # distinct empty tensors: custom-op outputs must not alias each other
        dh.to(hidden.dtype) if nh else hidden.new_empty(0),
        dw if nw else weight.new_empty(0),
        db.to(bias.dtype) if nb else hidden.new_empty(0),
    )


def logits_block(device: torch.device) -> tuple[int, int]:
    return (64, 4) if device.type == "cpu" else (1024, 8)


def sequence_logprob_fwd(logits, targets, seq_ids, p: LogitsParams):
    """``(logprob [S], num_tokens [S], lse [N])`` (float32): one program per row (``_fwd_kernel``)."""
    S, ignore_index = p.num_seqs, p.ignore_index
    N, V = logits.shape
    dev = logits.device
    logprob = torch.zeros(S, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    valid = targets != ignore_index
    num_tokens = torch.zeros(S, dtype=torch.long, device=dev).index_add_(0, seq_ids, valid.long())
    if N > 0 and V > 0:
        BV, warps = logits_block(dev)
        _kernels()._fwd_kernel[(N,)](
            logits, targets, seq_ids, lse, logprob, V, logits.stride(0), logits.stride(1), ignore_index,
            BLOCK_V=BV, num_warps=warps,
        )  # fmt: skip
    return logprob, num_tokens, lse


def sequence_logprob_bwd(grad, logits, targets, seq_ids, lse, p: LogitsGradParams):
    """``d_logits [N, V]`` in the logits' dtype (``_bwd_kernel``)."""
    ignore_index = p.ignore_index
    N, V = logits.shape
    out = torch.zeros(N, V, dtype=logits.dtype, device=logits.device)
    if N > 0 and V > 0:
        BV, warps = logits_block(logits.device)
        _kernels()._bwd_kernel[(N, _cdiv(V, BV))](
            grad.to(torch.float32).contiguous(), logits, targets, seq_ids, lse, out, V, logits.stride(0),
            logits.stride(1), out.stride(0), ignore_index, BLOCK_V=BV, num_warps=warps,
        )  # fmt: skip
    return out
