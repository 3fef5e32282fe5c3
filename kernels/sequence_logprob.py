"""Triton kernels of the per-sequence log-likelihood ops (launchers: antibody_fast/ops/sequence_logprob.py).

Row compaction without a host sync: the launcher sorts the row indices so that the scored rows come first
(``PERM``; stable, grad rows before non-grad rows) and passes their count as a device scalar (``NROWS_ptr``).
The grid is sized for every row, and a program whose first row lies beyond the count returns at once, so
ignored rows cost neither a matmul nor a host sync.

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
    SID_ptr,
    PERM_ptr,
    NROWS_ptr,
    LSE_ptr,
    LP_ptr,
    K,
    V,
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
    """One program = BLOCK_M scored rows: online log-sum-exp over vocabulary tiles, the label's logit,
    ``LSE[row]`` stored and ``log p(label)`` atomically added into ``LP[seq]`` (float32)."""
    pid = tl.program_id(0).to(tl.int64)
    n_rows = tl.load(NROWS_ptr)
    start = pid * BLOCK_M
    if start < n_rows:
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_rows
        rows = tl.load(PERM_ptr + offs_m, mask=mask_m, other=0)
        tgt = tl.load(T_ptr + rows, mask=mask_m, other=0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        z_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            z, _t = _logit_tile(
                H_ptr, W_ptr, B_ptr, rows, mask_m, offs_v, mask_v, K, stride_hm, stride_hk, stride_wv,
                stride_wk, softcap, HAS_BIAS, HAS_SOFTCAP, DOT_F32, BLOCK_M, BLOCK_V, BLOCK_K,
            )  # fmt: skip
            z = tl.where(mask_v[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_i = m_new
            z_t += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        lse = m_i + tl.log(l_i)
        lp = z_t - lse
        # non-finite results and labels outside [0, V) (possible when validation is off) give NaN
        finite = (lp == lp) & (tl.abs(lp) < float("inf")) & (tgt >= 0) & (tgt < V)
        lp = tl.where(finite, lp, float("nan"))
        tl.store(LSE_ptr + rows, lse, mask=mask_m)
        sid = tl.load(SID_ptr + rows, mask=mask_m, other=0)
        tl.atomic_add(LP_ptr + sid, lp, mask=mask_m)


@triton.jit
def _linear_grad_kernel(
    H_ptr,
    W_ptr,
    B_ptr,
    T_ptr,
    SID_ptr,
    PERM_ptr,
    NROWS_ptr,
    LSE_ptr,
    G_ptr,
    DH_ptr,
    DW_ptr,
    DB_ptr,
    K,
    V,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_dhm,
    stride_dwv,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_G: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program = (BLOCK_M scored rows) x (BLOCK_V vocabulary entries): recompute the logit tile,
    ``dz = g_seq * (onehot - p) * dcap`` (g_seq = 1 without ``G``), then atomically accumulate
    ``dH[row] += dz @ W``, ``dW += dz^T @ h`` and ``db += sum(dz)`` (float32 buffers)."""
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
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z, t = _logit_tile(
            H_ptr, W_ptr, B_ptr, rows, mask_m, offs_v, mask_v, K, stride_hm, stride_hk, stride_wv, stride_wk,
            softcap, HAS_BIAS, HAS_SOFTCAP, DOT_F32, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        p = tl.exp(z - lse[:, None])
        dz = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0) - p
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)
        if HAS_G:
            sid = tl.load(SID_ptr + rows, mask=mask_m, other=0)
            g = tl.load(G_ptr + sid, mask=mask_m, other=0.0)
            dz = dz * g[:, None]
        dz = tl.where(mask_m[:, None] & mask_v[None, :], dz, 0.0)
        if NEED_DB:
            tl.atomic_add(DB_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            if NEED_DH:
                w = tl.load(
                    W_ptr + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                    mask=mask_v[:, None] & mask_k[None, :],
                    other=0.0,
                )
                if DOT_F32:
                    dh = tl.dot(dz, w.to(tl.float32), input_precision="ieee")
                else:
                    dh = tl.dot(dz.to(w.dtype), w)
                tl.atomic_add(
                    DH_ptr + rows[:, None] * stride_dhm + offs_k[None, :],
                    dh,
                    mask=mask_m[:, None] & mask_k[None, :],
                )
            if NEED_DW:
                h = tl.load(
                    H_ptr + rows[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                    mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0,
                )
                if DOT_F32:
                    dw = tl.dot(tl.trans(dz), h.to(tl.float32), input_precision="ieee")
                else:
                    dw = tl.dot(tl.trans(dz.to(h.dtype)), h)
                tl.atomic_add(
                    DW_ptr + offs_v[:, None] * stride_dwv + offs_k[None, :],
                    dw,
                    mask=mask_v[:, None] & mask_k[None, :],
                )


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
