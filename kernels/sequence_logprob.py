"""Triton kernels of the per-sequence log-likelihood ops (launchers:
``antibody_fast/ops/sequence_logprob/_triton.py``).

Row compaction without a host sync: the launcher sorts the row indices so that the scored rows come first
(``PERM``; stable, grad rows before non-grad rows) and passes their count as a device scalar (``NROWS_ptr``).
The grid is sized for every row, and a program whose first row lies beyond the count returns at once, so
ignored rows cost neither a matmul nor a host sync. Buffers indexed by ``pos`` (partials, ``DZ``) use the
compacted position ``pos`` in ``PERM``; per-row outputs (``LSE``, ``DH``) use the row ``PERM[pos]``.

The fused lm_head op is tiled for a GPU (schedule and cost model:
``antibody_fast/ops/sequence_logprob/_triton.py``):

* forward: :func:`_linear_fwd_kernel` on a 2-D grid (row tiles x vocabulary chunks) writes per-chunk
  (max, sum-exp) partials; :func:`_lse_combine_kernel` merges them (a second small launch, no host sync);
* backward, one vocabulary chunk at a time: :func:`_linear_dz_kernel` stores the logit gradient of the chunk
  (bounded buffer ``[rows, chunk]``), then :func:`_linear_dh_kernel` (each program owns a dH tile) and
  :func:`_linear_dw_kernel` (each program owns a dW tile and loops over the rows) consume it. No atomics
  outside the per-sequence sum of ``_lse_combine_kernel``.

Numerics: everything elementwise runs in float32 right after the loads. ``DOT_F32`` upcasts the ``tl.dot``
operands to float32 as well (IEEE precision): always for float32 inputs and under the interpreter; on GPU
float16 / bfloat16 operands go to ``tl.dot`` natively (tensor cores) with float32 accumulation.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, NaN propagates; absolute error ~1 ulp of 1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logit_tile(
    H_ptr,
    W_ptr,
    B_ptr,
    rows,
    mask_m,
    offs_v,
    mask_v,
    K,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """[BLOCK_M, BLOCK_V] float32 logits (after bias and softcap) and the softcap's tanh (or 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        h = tl.load(
            H_ptr + rows[:, None] * stride_hm + offs_k[None, :] * stride_hk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = tl.load(
            W_ptr + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wk,
            mask=mask_v[:, None] & mask_k[None, :],
            other=0.0,
        )
        if DOT_F32:
            acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        b = tl.load(B_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    t = acc * 0.0
    if HAS_SOFTCAP:
        t = _tanh(acc / softcap)
        acc = softcap * t
    return acc, t


@triton.jit
def _linear_fwd_kernel(
    H_ptr,
    W_ptr,
    B_ptr,
    T_ptr,
    PERM_ptr,
    NROWS_ptr,
    PM_ptr,
    PL_ptr,
    PT_ptr,
    ZT_ptr,
    K,
    V,
    v_chunk,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_p,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (row tile ``i``, vocabulary chunk ``c``): BLOCK_M scored rows (compacted positions
    ``i * BLOCK_M + [0, BLOCK_M)``) x vocabulary ``[c * v_chunk, (c + 1) * v_chunk)``, in BLOCK_V tiles.

    Writes the chunk's partials ``PM[c, pos]`` (max logit) and ``PL[c, pos]`` (sum of ``exp(z - max)``), and
    ``ZT[pos]`` (the label's logit) from the one chunk that holds the label; with ``STATS`` also ``PT[c, pos]``
    (sum of ``exp(z - max) * z``, for the entropy). Plain stores: no atomics, and running it twice (the
    autotuner does) gives the same result."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    n_rows = tl.load(NROWS_ptr)
    start = pid_m * BLOCK_M
    if start < n_rows:
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_rows
        rows = tl.load(PERM_ptr + offs_m, mask=mask_m, other=0)
        tgt = tl.load(T_ptr + rows, mask=mask_m, other=0)
        v_lo = pid_c * v_chunk
        v_hi = tl.minimum(v_lo + v_chunk, V)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        z_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < v_hi
            z, _t = _logit_tile(
                H_ptr, W_ptr, B_ptr, rows, mask_m, offs_v, mask_v, K, stride_hm, stride_hk, stride_wv,
                stride_wk, softcap, HAS_BIAS, HAS_SOFTCAP, DOT_F32, BLOCK_M, BLOCK_V, BLOCK_K,
            )  # fmt: skip
            z = tl.where(mask_v[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            e = tl.exp(z - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(e, axis=1)
            if STATS:  # e = 0 where z = -inf (masked columns): skip those terms, 0 * -inf would be NaN
                t_i = t_i * alpha + tl.sum(tl.where(e > 0.0, e * z, 0.0), axis=1)
            m_i = m_new
            z_t += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        tl.store(PM_ptr + pid_c * stride_p + offs_m, m_i, mask=mask_m)
        tl.store(PL_ptr + pid_c * stride_p + offs_m, l_i, mask=mask_m)
        if STATS:
            tl.store(PT_ptr + pid_c * stride_p + offs_m, t_i, mask=mask_m)
        tl.store(ZT_ptr + offs_m, z_t, mask=mask_m & (tgt >= v_lo) & (tgt < v_hi))


@triton.jit
def _lse_combine_kernel(
    PM_ptr,
    PL_ptr,
    PT_ptr,
    ZT_ptr,
    T_ptr,
    SID_ptr,
    PERM_ptr,
    NROWS_ptr,
    LSE_ptr,
    LP_ptr,
    ENT_ptr,
    TOP_ptr,
    n_chunks,
    stride_p,
    V,
    STATS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program = BLOCK_R scored rows: merge the per-chunk (max, sum-exp) partials of
    :func:`_linear_fwd_kernel` into ``LSE[row]`` and atomically add ``log p(label) = ZT - LSE`` into
    ``LP[seq]`` (float32). Labels outside ``[0, V)`` and non-finite results give NaN. With ``STATS`` also the
    row's entropy ``ENT[row] = lse - sum(p * z)`` (from the ``PT`` partials) and ``TOP[row]`` (int8: the label's
    logit is the row's largest)."""
    pid = tl.program_id(0).to(tl.int64)
    n_rows = tl.load(NROWS_ptr)
    start = pid * BLOCK_R
    if start < n_rows:
        offs_m = start + tl.arange(0, BLOCK_R)
        mask_m = offs_m < n_rows
        m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_R,), dtype=tl.float32)
        t = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, n_chunks, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = mask_m[:, None] & (offs_c < n_chunks)[None, :]
            ptr = offs_c[None, :].to(tl.int64) * stride_p + offs_m[:, None]
            pm = tl.load(PM_ptr + ptr, mask=mask, other=float("-inf"))
            pl = tl.load(PL_ptr + ptr, mask=mask, other=0.0)
            m_new = tl.maximum(m, tl.max(pm, axis=1))
            # masked entries have pl = 0; keep exp() finite for them (-inf - -inf would be NaN)
            scale = tl.where(pm == float("-inf"), 0.0, tl.exp(pm - m_new[:, None]))
            alpha = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
            l = l * alpha + tl.sum(pl * scale, axis=1)
            if STATS:
                pt = tl.load(PT_ptr + ptr, mask=mask, other=0.0)
                t = t * alpha + tl.sum(tl.where(scale > 0.0, pt * scale, 0.0), axis=1)
            m = m_new
        lse = m + tl.log(l)
        rows = tl.load(PERM_ptr + offs_m, mask=mask_m, other=0)
        tgt = tl.load(T_ptr + rows, mask=mask_m, other=0)
        in_range = (tgt >= 0) & (tgt < V)
        zt = tl.load(ZT_ptr + offs_m, mask=mask_m & in_range, other=0.0)
        lp = zt - lse
        finite = (lp == lp) & (tl.abs(lp) < float("inf")) & in_range
        lp = tl.where(finite, lp, float("nan"))
        tl.store(LSE_ptr + rows, lse, mask=mask_m)
        sid = tl.load(SID_ptr + rows, mask=mask_m, other=0)
        tl.atomic_add(LP_ptr + sid, lp, mask=mask_m)
        if STATS:
            ent = lse - t / l
            ent = tl.where((ent == ent) & (tl.abs(ent) < float("inf")), ent, float("nan"))
            tl.store(ENT_ptr + rows, ent, mask=mask_m)
            tl.store(TOP_ptr + rows, (zt >= m).to(tl.int8), mask=mask_m & in_range)


@triton.jit
def _linear_dz_kernel(
    H_ptr,
    W_ptr,
    B_ptr,
    T_ptr,
    SID_ptr,
    PERM_ptr,
    NROWS_ptr,
    LSE_ptr,
    G_ptr,
    DZ_ptr,
    K,
    v_lo,
    v_hi,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_dz,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (row tile, vocabulary tile of the chunk ``[v_lo, v_hi)``): recompute the logit tile and store
    ``DZ[pos, v - v_lo] = g[seq] * (onehot - p) * dcap`` (``DZ``'s dtype: the input's, float32 for float32)
    for the scored compacted positions ``pos``. Plain stores (idempotent)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    n_rows = tl.load(NROWS_ptr)
    start = pid_m * BLOCK_M
    if start < n_rows:
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_rows
        rows = tl.load(PERM_ptr + offs_m, mask=mask_m, other=0)
        tgt = tl.load(T_ptr + rows, mask=mask_m, other=0)
        lse = tl.load(LSE_ptr + rows, mask=mask_m, other=0.0)
        offs_v = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        z, t = _logit_tile(
            H_ptr, W_ptr, B_ptr, rows, mask_m, offs_v, mask_v, K, stride_hm, stride_hk, stride_wv, stride_wk,
            softcap, HAS_BIAS, HAS_SOFTCAP, DOT_F32, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        p = tl.exp(z - lse[:, None])
        dz = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0) - p
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)
        sid = tl.load(SID_ptr + rows, mask=mask_m, other=0)
        g = tl.load(G_ptr + sid, mask=mask_m, other=0.0)
        dz = dz * g[:, None]
        tl.store(
            DZ_ptr + offs_m[:, None] * stride_dz + (offs_v - v_lo)[None, :],
            dz.to(DZ_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_v[None, :],
        )


@triton.jit
def _linear_dh_kernel(
    DZ_ptr,
    W_ptr,
    PERM_ptr,
    NROWS_ptr,
    DH_ptr,
    K,
    v_lo,
    v_hi,
    stride_dz,
    stride_wv,
    stride_wk,
    stride_dhm,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (row tile, hidden tile) owns ``DH[rows, k-tile]`` (float32) and adds
    ``DZ[pos, :] @ W[v_lo:v_hi, k-tile]``, looping over the chunk. One launch per chunk, so no two programs
    ever write the same element: no atomics (the autotuner restores ``DH`` between its trial runs)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    n_rows = tl.load(NROWS_ptr)
    start = pid_m * BLOCK_M
    if start < n_rows:
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_rows
        rows = tl.load(PERM_ptr + offs_m, mask=mask_m, other=0)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < v_hi
            dz = tl.load(
                DZ_ptr + offs_m[:, None] * stride_dz + (offs_v - v_lo)[None, :],
                mask=mask_m[:, None] & mask_v[None, :],
                other=0.0,
            )
            w = tl.load(
                W_ptr + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                mask=mask_v[:, None] & mask_k[None, :],
                other=0.0,
            )
            if DOT_F32:
                acc = tl.dot(dz.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(dz, w, acc)
        ptr = DH_ptr + rows[:, None] * stride_dhm + offs_k[None, :]
        mask = mask_m[:, None] & mask_k[None, :]
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _linear_dw_kernel(
    DZ_ptr,
    H_ptr,
    PERM_ptr,
    NROWS_ptr,
    DW_ptr,
    DB_ptr,
    K,
    v_lo,
    v_hi,
    stride_dz,
    stride_hm,
    stride_hk,
    stride_dwv,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (vocabulary tile of the chunk, hidden tile) owns ``DW[v-tile, k-tile]`` and loops over every
    scored row: ``DW = DZ^T @ H[rows]``, stored once in ``DW``'s dtype; programs of hidden tile 0 also store
    ``DB[v-tile] = sum over rows of DZ`` (float32). No atomics; idempotent."""
    pid_v = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    n_rows = tl.load(NROWS_ptr)
    offs_v = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < v_hi
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_V, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < n_rows
        dz = tl.load(
            DZ_ptr + offs_m[:, None] * stride_dz + (offs_v - v_lo)[None, :],
            mask=mask_m[:, None] & mask_v[None, :],
            other=0.0,
        )
        if NEED_DW:
            rows = tl.load(PERM_ptr + offs_m, mask=mask_m, other=0)
            h = tl.load(
                H_ptr + rows[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            if DOT_F32:
                acc = tl.dot(tl.trans(dz.to(tl.float32)), h.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(dz), h, acc)
        if NEED_DB:
            acc_b += tl.sum(dz.to(tl.float32), axis=0)
    if NEED_DW:
        tl.store(
            DW_ptr + offs_v[:, None] * stride_dwv + offs_k[None, :],
            acc.to(DW_ptr.dtype.element_ty),
            mask=mask_v[:, None] & mask_k[None, :],
        )
    if NEED_DB:
        if pid_k == 0:
            tl.store(DB_ptr + offs_v, acc_b, mask=mask_v)


@triton.jit
def _fwd_kernel(
    L_ptr,
    T_ptr,
    SID_ptr,
    LSE_ptr,
    LP_ptr,
    V,
    stride_lm,
    stride_lv,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One program = one row of logits: online log-sum-exp, ``LSE[row]``, ``LP[seq] += log p(label)``.
    Ignored rows return at once."""
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(T_ptr + row)
    if tgt != ignore_index:
        m_i = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(L_ptr + row * stride_lm + offs_v * stride_lv, mask=offs_v < V, other=float("-inf"))
            z = z.to(tl.float32)
            m_new = tl.maximum(m_i, z)
            # lanes still at -inf keep l = 0 (avoid -inf - -inf)
            scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m_i - m_new))
            add = tl.where(m_new == float("-inf"), 0.0, tl.exp(z - m_new))
            l_i = l_i * scale + add
            m_i = m_new
        m = tl.max(m_i, axis=0)
        l_tot = tl.sum(tl.where(m_i == float("-inf"), 0.0, l_i * tl.exp(m_i - m)), axis=0)
        lse = m + tl.log(l_tot)
        in_range = (tgt >= 0) & (
            tgt < V
        )  # labels outside [0, V) (validation off) give NaN, never a stray read
        zt = tl.load(L_ptr + row * stride_lm + tgt * stride_lv, mask=in_range, other=float("nan")).to(
            tl.float32
        )
        lp = zt - lse
        finite = (lp == lp) & (tl.abs(lp) < float("inf")) & in_range
        lp = tl.where(finite, lp, float("nan"))
        tl.store(LSE_ptr + row, lse)
        sid = tl.load(SID_ptr + row)
        tl.atomic_add(LP_ptr + sid, lp)


@triton.jit
def _bwd_kernel(
    G_ptr,
    L_ptr,
    T_ptr,
    SID_ptr,
    LSE_ptr,
    OUT_ptr,
    V,
    stride_lm,
    stride_lv,
    stride_om,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """Program (row, vocabulary tile): ``OUT[row, tile] = g_seq * (onehot - p)``; ignored rows are left as
    the zeros the launcher allocated."""
    row = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    tgt = tl.load(T_ptr + row)
    if tgt != ignore_index:
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = tl.load(L_ptr + row * stride_lm + offs_v * stride_lv, mask=mask_v, other=0.0).to(tl.float32)
        lse = tl.load(LSE_ptr + row)
        g = tl.load(G_ptr + tl.load(SID_ptr + row))
        d = g * (tl.where(offs_v == tgt, 1.0, 0.0) - tl.exp(z - lse))
        tl.store(OUT_ptr + row * stride_om + offs_v, d.to(OUT_ptr.dtype.element_ty), mask=mask_v)


# keep a reference so linters see triton used (the module is imported lazily by the launchers)
cdiv = triton.cdiv
