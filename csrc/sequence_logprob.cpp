// C++ CPU kernels of the per-sequence log-likelihood ops (antibody_fast/ops/sequence_logprob/).
//
//   torch.ops.antibody_fast_cpp.linear_sequence_logprob_fwd / _bwd   (fused with the lm_head matmul)
//   torch.ops.antibody_fast_cpp.sequence_logprob_fwd / _bwd          (from logits)
//
// Linear op: the scored rows (label != ignore_index) are compacted first, then processed in chunks of C rows:
// one at::addmm/at::mm gives the [C, V] logit tile, a fused OpenMP pass per row computes the log-sum-exp,
// the label's log-probability and (when asked) the row gradient (onehot - p) * dcap in place, and one more
// matmul turns that into dlogp/dh (frozen-weight "precompute" mode) or into dH / dW / db (backward).
// Memory is bounded by the chunk: C * V accumulation-dtype elements (plus the [rows, H] outputs).
// The forward runs as ONE parallel region over chunks (each thread: its own single-threaded matmuls and row
// pass on a private buffer; total budget ~8M logits shared by the threads), which avoids OpenMP barriers
// and spin-waiting between the matmuls and the row pass; ANTIBODY_FAST_CPP_FWD_SCHEDULE=rows selects the
// older per-chunk schedule (multithreaded matmuls + parallel row pass), ANTIBODY_FAST_CPP_CHUNK_ELEMS the
// logits budget. The backward (recompute mode) keeps the per-chunk schedule (dW accumulates across chunks).
// Accumulation: float32 for float16/bfloat16/float32 inputs, float64 for float64 inputs; per-sequence sums
// are accumulated in double, serially, so results are deterministic. With row_stats the forward also writes
// each scored row's entropy and top-1 flag (one more pass over the row's logits, before they are overwritten).
//
// The float32 hot loops (max / sum of exp / exp) use a vectorisable exp and are compiled twice (AVX2+FMA and
// baseline x86-64), chosen at run time.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <type_traits>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

#if defined(__x86_64__) && defined(__GNUC__)
#define AF_HAVE_AVX2_CLONE 1
#define AF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define AF_HAVE_AVX2_CLONE 0
#define AF_TARGET_AVX2
#endif

// exp for float32 (Cephes polynomial, ~1 ulp on [-87, 88]); written so that the loops below vectorise.
// Inputs <= -88 give 0 (exp(-88) is a float32 denormal); NaN propagates.
AF_INLINE float fast_expf(float x) {
  x = x < -88.0f ? -88.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round to nearest with the 1.5 * 2^23 trick (|x * log2e| < 2^22): plain adds, so the loop vectorises
  const float magic = 12582912.0f;
  float k = (x * 1.44269504088896341f + magic) - magic;
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t ki = static_cast<int32_t>(k) + 127;
  ki = ki < 0 ? 0 : ki;
  int32_t bits = ki << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log-sum-exp of one float32 row.
AF_INLINE float row_lse_body(const float* z, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
#pragma omp simd reduction(max : m) reduction(|| : nan)
  for (int64_t i = 0; i < n; ++i) {
    m = z[i] > m ? z[i] : m;
    nan = nan || (z[i] != z[i]);
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  if (!std::isfinite(m)) return m == -std::numeric_limits<float>::infinity() ? m : std::numeric_limits<float>::quiet_NaN();
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += fast_expf(z[i] - m);
  return m + std::log(s);
}

// out[i] = -scale * exp(z[i] - lse)  (out may alias z).
AF_INLINE void row_neg_softmax_body(const float* z, float* out, int64_t n, float lse, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = -scale * fast_expf(z[i] - lse);
}

#if AF_HAVE_AVX2_CLONE
// AVX2 + FMA versions with intrinsics (the compiler does not vectorise the clamped polynomial by itself).
AF_TARGET_AVX2 inline __m256 exp256(__m256 x) {
  // max/min with x as the second operand return x when it is NaN, so NaN propagates
  x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(k, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i ki = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
  ki = _mm256_max_epi32(ki, _mm256_setzero_si256());
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(ki, 23)));
}

AF_TARGET_AVX2 inline float hsum256(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

AF_TARGET_AVX2 inline float hmax256(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

AF_TARGET_AVX2 float row_lse_avx2(const float* z, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  __m256 vm = _mm256_set1_ps(ninf);
  __m256 vnan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(z + i);
    vm = _mm256_max_ps(vm, v);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float m = hmax256(vm);
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (; i < n; ++i) {
    m = z[i] > m ? z[i] : m;
    nan = nan || (z[i] != z[i]);
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  if (!std::isfinite(m)) return m == ninf ? m : std::numeric_limits<float>::quiet_NaN();
  const __m256 mm = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_add_ps(s0, exp256(_mm256_sub_ps(_mm256_loadu_ps(z + i), mm)));
    s1 = _mm256_add_ps(s1, exp256(_mm256_sub_ps(_mm256_loadu_ps(z + i + 8), mm)));
  }
  float s = hsum256(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += fast_expf(z[i] - m);
  return m + std::log(s);
}

AF_TARGET_AVX2 void row_neg_softmax_avx2(const float* z, float* out, int64_t n, float lse, float scale) {
  const __m256 l = _mm256_set1_ps(lse);
  const __m256 ns = _mm256_set1_ps(-scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_mul_ps(ns, exp256(_mm256_sub_ps(_mm256_loadu_ps(z + i), l))));
  }
  for (; i < n; ++i) out[i] = -scale * fast_expf(z[i] - lse);
}

// Row statistics of a float32 row: sum of exp(z - lse) * z over the entries with exp(z - lse) > 0 (a -inf
// logit adds nothing) and the row maximum, 16 lanes at a time.
AF_TARGET_AVX2 void row_pz_max_avx2(const float* z, int64_t n, float lse, float* pz, float* zmax) {
  const __m256 l = _mm256_set1_ps(lse);
  const __m256 zero = _mm256_setzero_ps();
  __m256 a0 = zero, a1 = zero;
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(z + i), v1 = _mm256_loadu_ps(z + i + 8);
    const __m256 p0 = exp256(_mm256_sub_ps(v0, l)), p1 = exp256(_mm256_sub_ps(v1, l));
    a0 = _mm256_add_ps(a0, _mm256_and_ps(_mm256_cmp_ps(p0, zero, _CMP_GT_OQ), _mm256_mul_ps(p0, v0)));
    a1 = _mm256_add_ps(a1, _mm256_and_ps(_mm256_cmp_ps(p1, zero, _CMP_GT_OQ), _mm256_mul_ps(p1, v1)));
    m0 = _mm256_max_ps(m0, v0);
    m1 = _mm256_max_ps(m1, v1);
  }
  float s = hsum256(_mm256_add_ps(a0, a1));
  float m = hmax256(_mm256_max_ps(m0, m1));
  for (; i < n; ++i) {
    const float p = fast_expf(z[i] - lse);
    if (p > 0.f) s += p * z[i];
    m = z[i] > m ? z[i] : m;
  }
  *pz = s;
  *zmax = m;
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif
float row_lse_base(const float* z, int64_t n) { return row_lse_body(z, n); }
void row_neg_softmax_base(const float* z, float* out, int64_t n, float lse, float scale) {
  row_neg_softmax_body(z, out, n, lse, scale);
}

inline float row_lse(const float* z, int64_t n) {
#if AF_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return row_lse_avx2(z, n);
#endif
  return row_lse_base(z, n);
}
inline void row_neg_softmax(const float* z, float* out, int64_t n, float lse, float scale) {
#if AF_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return row_neg_softmax_avx2(z, out, n, lse, scale);
#endif
  row_neg_softmax_base(z, out, n, lse, scale);
}

// float64 versions (tests / gradcheck): plain loops.
inline double row_lse(const double* z, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    m = z[i] > m ? z[i] : m;
    nan = nan || (z[i] != z[i]);
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (!std::isfinite(m)) return m == -std::numeric_limits<double>::infinity() ? m : std::numeric_limits<double>::quiet_NaN();
  double s = 0.;
  for (int64_t i = 0; i < n; ++i) s += std::exp(z[i] - m);
  return m + std::log(s);
}
inline void row_neg_softmax(const double* z, double* out, int64_t n, double lse, double scale) {
  for (int64_t i = 0; i < n; ++i) out[i] = -scale * std::exp(z[i] - lse);
}

template <typename T>
inline T nan_if_nonfinite(T x) {
  return std::isfinite(x) ? x : std::numeric_limits<T>::quiet_NaN();
}

inline float exp_t(float x) { return fast_expf(x); }
inline double exp_t(double x) { return std::exp(x); }

// Row statistics of the (soft-capped) logits z[V] with log-sum-exp lse: the entropy lse - sum_v p_v z_v
// (terms with p_v = 0 skipped, so a -inf logit adds nothing) and whether the label's logit is the largest.
template <typename T>
inline void row_pz_max(const T* z, int64_t V, T lse, T* pz_out, T* zmax_out) {
#if AF_HAVE_AVX2_CLONE
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return row_pz_max_avx2(z, V, lse, pz_out, zmax_out);
  }
#endif
  double pz = 0.0;
  T zmax = -std::numeric_limits<T>::infinity();
  for (int64_t v = 0; v < V; ++v) {
    const T p = exp_t(z[v] - lse);
    if (p > T(0)) pz += static_cast<double>(p * z[v]);
    zmax = z[v] > zmax ? z[v] : zmax;
  }
  *pz_out = static_cast<T>(pz);
  *zmax_out = zmax;
}

template <typename T>
inline void row_stats(const T* z, int64_t V, int64_t label, T lse, T* entropy, bool* top1) {
  T pz, zmax;
  row_pz_max(z, V, lse, &pz, &zmax);
  *entropy = nan_if_nonfinite(static_cast<T>(lse - pz));
  *top1 = z[label] >= zmax;
}

// One row of logits z[V] (accumulation dtype, modified in place): applies the softcap, returns
// (lse, logp(label)); with `entropy` / `top1` given, also the row statistics (row_stats, before z changes);
// when want_grad, overwrites z with grad_scale * (onehot(label) - p) * dcap, where dcap = 1 - tanh^2 is the
// softcap's derivative. lse_given: skip the log-sum-exp (backward recompute).
template <typename T>
inline std::pair<T, T> process_row(T* z, int64_t V, int64_t label, std::optional<double> softcap, bool want_grad,
                                   T grad_scale, const T* lse_given, T* entropy = nullptr, bool* top1 = nullptr) {
  if (softcap) {
    const T c = static_cast<T>(*softcap);
    for (int64_t v = 0; v < V; ++v) z[v] = c * std::tanh(z[v] / c);
  }
  const T lse = lse_given ? *lse_given : row_lse(z, V);
  const T lp = nan_if_nonfinite(z[label] - lse);
  if (entropy) row_stats(z, V, label, lse, entropy, top1);
  if (want_grad) {
    const T zy = z[label];
    if (softcap) {
      const T inv_c = T(1) / static_cast<T>(*softcap);
      for (int64_t v = 0; v < V; ++v) {
        const T t = z[v] * inv_c;
        z[v] = -grad_scale * exp_t(z[v] - lse) * (T(1) - t * t);
      }
      const T ty = zy * inv_c;
      z[label] += grad_scale * (T(1) - ty * ty);
    } else {
      row_neg_softmax(z, z, V, lse, grad_scale);
      z[label] += grad_scale;
    }
  }
  return {lse, lp};
}

void check_common(const Tensor& x, const Tensor& targets, const Tensor& seq_ids, const char* what) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), what, ": the C++ kernels take CPU tensors, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, what, ": expected a 2-D [rows, features] tensor, got ", x.sizes());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == x.size(0) && targets.scalar_type() == at::kLong,
                    what, ": targets must be int64 [", x.size(0), "]");
  TORCH_CHECK_VALUE(seq_ids.dim() == 1 && seq_ids.size(0) == x.size(0) && seq_ids.scalar_type() == at::kLong,
                    what, ": seq_ids must be int64 [", x.size(0), "]");
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Scored rows (label != ignore, index < row_limit) in increasing order; validates labels and seq ids.
// Counts tokens per sequence into num_tokens (if defined) over all scored rows (not limited by row_limit).
std::vector<int64_t> scored_rows(const Tensor& targets_c, const Tensor& seq_ids_c, int64_t V, int64_t S,
                                 int64_t ignore_index, int64_t row_limit, Tensor* num_tokens) {
  const int64_t N = targets_c.size(0);
  const int64_t* tg = targets_c.data_ptr<int64_t>();
  const int64_t* sid = seq_ids_c.data_ptr<int64_t>();
  int64_t* nt = num_tokens ? num_tokens->data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> rows;
  rows.reserve(N);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y = tg[i];
    if (y == ignore_index) continue;
    TORCH_CHECK_VALUE(y >= 0 && y < V, "sequence_logprob: label ", y, " (row ", i, ") is outside [0, ", V,
                      ") and is not ignore_index=", ignore_index);
    TORCH_CHECK_VALUE(sid[i] >= 0 && sid[i] < S, "sequence_logprob: seq id ", sid[i], " (row ", i,
                      ") is outside [0, ", S, ")");
    if (nt) nt[sid[i]] += 1;
    if (i < row_limit) rows.push_back(i);
  }
  return rows;
}

int64_t chunk_elems() {
  // logits per chunk: 8M (32 MiB in fp32) unless ANTIBODY_FAST_CPP_CHUNK_ELEMS says otherwise (tuning)
  static const int64_t n = [] {
    const char* e = std::getenv("ANTIBODY_FAST_CPP_CHUNK_ELEMS");
    const long long v = e ? std::atoll(e) : 0;
    return v > 0 ? static_cast<int64_t>(v) : (int64_t(1) << 23);
  }();
  return n;
}

int64_t chunk_rows(int64_t V) {
  // chunk_elems() logits per chunk, at least 16 rows, multiple of 16 for the matmul.
  int64_t c = chunk_elems() / std::max<int64_t>(V, 1);
  c = std::max<int64_t>(16, std::min<int64_t>(c, 4096));
  return c / 16 * 16;
}

Tensor rows_tensor(const std::vector<int64_t>& rows) {
  auto t = at::empty({static_cast<int64_t>(rows.size())}, at::TensorOptions().dtype(at::kLong));
  if (!rows.empty()) std::memcpy(t.data_ptr<int64_t>(), rows.data(), rows.size() * sizeof(int64_t));
  return t;
}

// ---------------------------------------------------------------------------------------------------------
// fused linear op
// ---------------------------------------------------------------------------------------------------------

// Logits of one chunk of scored rows into z [c, V]: gather the rows of `hidden` at `idx`, upcast them to
// `acc`, z = h @ Wt (+ bias). Returns the gathered rows (the backward reuses them for dW).
Tensor chunk_logits(Tensor& z, const Tensor& hidden, const Tensor& idx, const Tensor& Wt,
                    const std::optional<Tensor>& bias, at::ScalarType acc) {
  Tensor h = hidden.index_select(0, idx).to(acc);
  if (bias) {
    at::addmm_out(z, *bias, h, Wt);
  } else {
    at::mm_out(z, h, Wt);
  }
  return h;
}

template <typename T>
void linear_fwd_impl(const Tensor& hidden, const Tensor& W, const std::optional<Tensor>& bias,
                     const Tensor& targets, const Tensor& seq_ids, const std::vector<int64_t>& rows, int64_t ng,
                     std::optional<double> softcap, bool precompute, Tensor& logprob, Tensor& lse, Tensor& dh,
                     T* ent_p, bool* top_p) {
  const int64_t V = W.size(0);
  const int64_t R = static_cast<int64_t>(rows.size());
  if (R == 0) return;
  const auto acc = W.scalar_type();
  const Tensor Wt = W.t();
  const int64_t C = std::min<int64_t>(chunk_rows(V), R);
  Tensor zbuf = at::empty({C, V}, W.options());
  Tensor idx_all = rows_tensor(rows);
  const int64_t* tg = targets.data_ptr<int64_t>();
  const int64_t* sid = seq_ids.data_ptr<int64_t>();
  T* lse_p = lse.data_ptr<T>();
  std::vector<double> seq_acc(logprob.size(0), 0.0);
  std::vector<T> lp_buf(C);
  for (int64_t start = 0; start < R; start += C) {
    const int64_t c = std::min(C, R - start);
    Tensor idx = idx_all.narrow(0, start, c);
    Tensor z = zbuf.narrow(0, 0, c);
    chunk_logits(z, hidden, idx, Wt, bias, acc);
    // grad rows (index < ng) form a prefix of the chunk since rows are increasing
    const int64_t* rp = rows.data() + start;
    const int64_t cg = precompute ? static_cast<int64_t>(std::lower_bound(rp, rp + c, ng) - rp) : 0;
    T* zp = z.data_ptr<T>();
    at::parallel_for(0, c, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t r = rp[i];
        auto res = process_row<T>(zp + i * V, V, tg[r], softcap, i < cg, T(1), nullptr, ent_p ? ent_p + r : nullptr,
                                  top_p ? top_p + r : nullptr);
        lse_p[r] = res.first;
        lp_buf[i] = res.second;
      }
    });
    for (int64_t i = 0; i < c; ++i) seq_acc[sid[rp[i]]] += static_cast<double>(lp_buf[i]);
    if (cg > 0) {
      dh.index_copy_(0, idx.narrow(0, 0, cg), at::mm(z.narrow(0, 0, cg), W));
    }
  }
  T* out = logprob.data_ptr<T>();
  for (int64_t s = 0; s < logprob.size(0); ++s) out[s] = nan_if_nonfinite(static_cast<T>(seq_acc[s]));
}

// Same result as linear_fwd_impl, scheduled as ONE parallel region over row chunks: every thread runs its
// own (single-threaded) matmuls and the fused row pass on a private [C, V] buffer, with C = the chunk budget
// divided by the thread count (same total memory). No barrier between the matmuls and the row pass, so no
// OpenMP spin-waiting between them. Per-row log-probabilities are summed per sequence serially afterwards
// (deterministic).
template <typename T>
void linear_fwd_impl_chunks(const Tensor& hidden, const Tensor& W, const std::optional<Tensor>& bias,
                            const Tensor& targets, const Tensor& seq_ids, const std::vector<int64_t>& rows,
                            int64_t ng, std::optional<double> softcap, bool precompute, Tensor& logprob,
                            Tensor& lse, Tensor& dh, T* ent_p, bool* top_p) {
  const int64_t V = W.size(0), H = W.size(1);
  const int64_t R = static_cast<int64_t>(rows.size());
  if (R == 0) return;
  const auto acc = W.scalar_type();
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  int64_t C = std::max<int64_t>(16, chunk_rows(V) / nt / 16 * 16);
  C = std::min<int64_t>(C, R);
  const int64_t n_chunks = (R + C - 1) / C;
  Tensor idx_all = rows_tensor(rows);
  const int64_t* tg = targets.data_ptr<int64_t>();
  const int64_t* sid = seq_ids.data_ptr<int64_t>();
  T* lse_p = lse.data_ptr<T>();
  T* dh_p = precompute ? dh.data_ptr<T>() : nullptr;
  std::vector<T> lp_all(R);
  // worker threads do not inherit the dispatcher's "below autograd" state: work on detached tensors
  const Tensor hid = hidden.detach();
  const Tensor Wd = W.detach();
  const Tensor Wdt = Wd.t();
  std::optional<Tensor> bd;
  if (bias) bd = bias->detach();
  // Balance the threads: rows needing a gradient (a prefix of `rows`) cost a second matmul, so a contiguous
  // split of the chunks would give one thread most of the grad rows (e.g. paired completion + refusal calls).
  // Each thread instead takes an equal share of the grad rows and an equal share of the other rows.
  const int64_t G = precompute ? static_cast<int64_t>(std::lower_bound(rows.begin(), rows.end(), ng) - rows.begin())
                               : 0;
  const int64_t n_workers = std::min<int64_t>(nt, n_chunks);
  at::parallel_for(0, n_workers, 1, [&](int64_t w0, int64_t w1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor zbuf = at::empty({C, V}, Wd.options());
    std::vector<std::pair<int64_t, int64_t>> chunks;  // (start, count) into rows
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t seg[2][2] = {{G * w / n_workers, G * (w + 1) / n_workers},
                                 {G + (R - G) * w / n_workers, G + (R - G) * (w + 1) / n_workers}};
      for (const auto& sg : seg)
        for (int64_t st = sg[0]; st < sg[1]; st += C) chunks.emplace_back(st, std::min(C, sg[1] - st));
    }
    for (const auto& [start, c] : chunks) {
      Tensor idx = idx_all.narrow(0, start, c);
      Tensor z = zbuf.narrow(0, 0, c);
      chunk_logits(z, hid, idx, Wdt, bd, acc);
      const int64_t* rp = rows.data() + start;
      const int64_t cg = precompute ? static_cast<int64_t>(std::lower_bound(rp, rp + c, ng) - rp) : 0;
      T* zp = z.data_ptr<T>();
      for (int64_t i = 0; i < c; ++i) {
        const int64_t r = rp[i];
        auto res = process_row<T>(zp + i * V, V, tg[r], softcap, i < cg, T(1), nullptr, ent_p ? ent_p + r : nullptr,
                                  top_p ? top_p + r : nullptr);
        lse_p[r] = res.first;
        lp_all[start + i] = res.second;
      }
      if (cg > 0) {
        Tensor d = at::mm(z.narrow(0, 0, cg), Wd).contiguous();
        const T* dp = d.data_ptr<T>();
        for (int64_t i = 0; i < cg; ++i) std::memcpy(dh_p + rp[i] * H, dp + i * H, H * sizeof(T));
      }
    }
  });
  std::vector<double> seq_acc(logprob.size(0), 0.0);
  for (int64_t i = 0; i < R; ++i) seq_acc[sid[rows[i]]] += static_cast<double>(lp_all[i]);
  T* out = logprob.data_ptr<T>();
  for (int64_t s = 0; s < logprob.size(0); ++s) out[s] = nan_if_nonfinite(static_cast<T>(seq_acc[s]));
}

// Forward schedule: "chunks" (default: linear_fwd_impl_chunks) or "rows" (linear_fwd_impl: multithreaded
// matmuls, then a parallel row pass, per chunk). ANTIBODY_FAST_CPP_FWD_SCHEDULE overrides (benchmarking).
bool chunk_schedule() {
  static const bool chunks = [] {
    const char* e = std::getenv("ANTIBODY_FAST_CPP_FWD_SCHEDULE");
    return !(e && std::string_view(e) == "rows");
  }();
  return chunks;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_sequence_logprob_fwd(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& targets,
    const Tensor& seq_ids, int64_t num_seqs, int64_t num_grad_rows, std::optional<double> softcap,
    int64_t ignore_index, std::string_view mode, bool row_stats) {
  check_common(hidden, targets, seq_ids, "linear_sequence_logprob_fwd");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.device().is_cpu(),
                    "linear_sequence_logprob_fwd: weight must be a CPU [V, H] tensor with H = ", hidden.size(1));
  TORCH_CHECK_VALUE(weight.scalar_type() == hidden.scalar_type(), "linear_sequence_logprob_fwd: dtype mismatch");
  TORCH_CHECK_VALUE(mode == "none" || mode == "precompute" || mode == "recompute",
                    "linear_sequence_logprob_fwd: unknown mode");
  TORCH_CHECK_VALUE(num_seqs >= 0 && num_grad_rows >= 0 && num_grad_rows <= hidden.size(0),
                    "linear_sequence_logprob_fwd: bad num_seqs / num_grad_rows");
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = acc_type(hidden.scalar_type());
  const bool precompute = mode == "precompute";
  auto fopt = hidden.options().dtype(acc);
  Tensor logprob = at::zeros({num_seqs}, fopt);
  Tensor num_tokens = at::zeros({num_seqs}, hidden.options().dtype(at::kLong));
  Tensor lse = at::zeros({N}, fopt);
  Tensor dh = at::zeros({precompute ? num_grad_rows : 0, H}, fopt);
  // per-row statistics (0 / false on unscored rows)
  Tensor entropy = at::zeros({row_stats ? N : 0}, fopt);
  Tensor top1 = at::zeros({row_stats ? N : 0}, hidden.options().dtype(at::kBool));
  bool* top_p = row_stats ? top1.data_ptr<bool>() : nullptr;
  Tensor tg = targets.contiguous(), sid = seq_ids.contiguous();
  auto rows = scored_rows(tg, sid, V, num_seqs, ignore_index, N, &num_tokens);
  if (rows.empty()) return {logprob, num_tokens, lse, dh, entropy, top1};
  Tensor W = weight.to(acc);
  std::optional<Tensor> b;
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == V, "linear_sequence_logprob_fwd: bias must be [V]");
    b = bias->to(acc);
  }
  if (acc == at::kDouble) {
    double* ent_p = row_stats ? entropy.data_ptr<double>() : nullptr;
    if (chunk_schedule()) {
      linear_fwd_impl_chunks<double>(hidden, W, b, tg, sid, rows, num_grad_rows, softcap, precompute, logprob, lse,
                                     dh, ent_p, top_p);
    } else {
      linear_fwd_impl<double>(hidden, W, b, tg, sid, rows, num_grad_rows, softcap, precompute, logprob, lse, dh,
                              ent_p, top_p);
    }
  } else {
    float* ent_p = row_stats ? entropy.data_ptr<float>() : nullptr;
    if (chunk_schedule()) {
      linear_fwd_impl_chunks<float>(hidden, W, b, tg, sid, rows, num_grad_rows, softcap, precompute, logprob, lse,
                                    dh, ent_p, top_p);
    } else {
      linear_fwd_impl<float>(hidden, W, b, tg, sid, rows, num_grad_rows, softcap, precompute, logprob, lse, dh,
                             ent_p, top_p);
    }
  }
  return {logprob, num_tokens, lse, dh, entropy, top1};
}

template <typename T>
void linear_bwd_impl(const Tensor& grad, const Tensor& hidden, const Tensor& W, const std::optional<Tensor>& bias,
                     const Tensor& targets, const Tensor& seq_ids, const Tensor& lse,
                     const std::vector<int64_t>& rows, std::optional<double> softcap, Tensor* dh, Tensor* dw,
                     Tensor* db) {
  const int64_t V = W.size(0);
  const int64_t R = static_cast<int64_t>(rows.size());
  if (R == 0) return;
  const auto acc = W.scalar_type();
  const Tensor Wt = W.t();
  const int64_t C = std::min<int64_t>(chunk_rows(V), R);
  Tensor zbuf = at::empty({C, V}, W.options());
  Tensor idx_all = rows_tensor(rows);
  const int64_t* tg = targets.data_ptr<int64_t>();
  const int64_t* sid = seq_ids.data_ptr<int64_t>();
  const T* lse_p = lse.data_ptr<T>();
  const T* g = grad.data_ptr<T>();
  for (int64_t start = 0; start < R; start += C) {
    const int64_t c = std::min(C, R - start);
    Tensor idx = idx_all.narrow(0, start, c);
    Tensor z = zbuf.narrow(0, 0, c);
    const Tensor h = chunk_logits(z, hidden, idx, Wt, bias, acc);
    const int64_t* rp = rows.data() + start;
    T* zp = z.data_ptr<T>();
    at::parallel_for(0, c, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t r = rp[i];
        process_row<T>(zp + i * V, V, tg[r], softcap, true, g[sid[r]], lse_p + r);
      }
    });
    if (dh) dh->index_copy_(0, idx, at::mm(z, W));
    if (dw) dw->addmm_(z.t(), h);
    if (db) db->add_(z.sum(0));
  }
}

std::tuple<Tensor, Tensor, Tensor> linear_sequence_logprob_bwd(
    const Tensor& grad_logprob, const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& targets, const Tensor& seq_ids, const Tensor& lse, int64_t num_grad_rows,
    std::optional<double> softcap, int64_t ignore_index, bool need_dh, bool need_dw, bool need_db) {
  check_common(hidden, targets, seq_ids, "linear_sequence_logprob_bwd");
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const int64_t S = grad_logprob.size(0);
  const auto acc = acc_type(hidden.scalar_type());
  need_db = need_db && bias.has_value();
  auto fopt = hidden.options().dtype(acc);
  Tensor dh = need_dh ? at::zeros({N, H}, fopt) : Tensor();
  Tensor dw = need_dw ? at::zeros({V, H}, fopt) : Tensor();
  Tensor db = need_db ? at::zeros({V}, fopt) : Tensor();
  Tensor tg = targets.contiguous(), sid = seq_ids.contiguous();
  auto rows = scored_rows(tg, sid, V, S, ignore_index, num_grad_rows, nullptr);
  if (!rows.empty() && (need_dh || need_dw || need_db)) {
    Tensor W = weight.to(acc);
    std::optional<Tensor> b;
    if (bias) b = bias->to(acc);
    Tensor g = grad_logprob.to(acc).contiguous();
    Tensor l = lse.to(acc).contiguous();
    Tensor* pdh = need_dh ? &dh : nullptr;
    Tensor* pdw = need_dw ? &dw : nullptr;
    Tensor* pdb = need_db ? &db : nullptr;
    if (acc == at::kDouble) {
      linear_bwd_impl<double>(g, hidden, W, b, tg, sid, l, rows, softcap, pdh, pdw, pdb);
    } else {
      linear_bwd_impl<float>(g, hidden, W, b, tg, sid, l, rows, softcap, pdh, pdw, pdb);
    }
  }
  // distinct empty tensors: custom-op outputs must not alias each other
  return {need_dh ? dh.to(hidden.scalar_type()) : at::empty({0}, hidden.options()),
          need_dw ? dw.to(weight.scalar_type()) : at::empty({0}, weight.options()),
          need_db ? db.to(bias->scalar_type()) : at::empty({0}, hidden.options())};
}

// ---------------------------------------------------------------------------------------------------------
// op from logits
// ---------------------------------------------------------------------------------------------------------

// Row r of logits as accumulation-dtype values: a pointer into the tensor when it already has that dtype
// (rows with unit stride), else a conversion into buf.
template <typename T>
const T* row_as(const Tensor& logits, int64_t r, std::vector<T>& buf) {
  const int64_t V = logits.size(1);
  if (logits.scalar_type() == c10::CppTypeToScalarType<T>::value) {
    return logits.data_ptr<T>() + r * logits.stride(0);
  }
  buf.resize(V);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "row_as", [&] {
    const scalar_t* p = logits.data_ptr<scalar_t>() + r * logits.stride(0);
    for (int64_t v = 0; v < V; ++v) buf[v] = static_cast<T>(p[v]);
  });
  return buf.data();
}

template <typename T>
void fwd_impl(const Tensor& logits, const Tensor& targets, const Tensor& seq_ids, const std::vector<int64_t>& rows,
              Tensor& logprob, Tensor& lse) {
  const int64_t V = logits.size(1);
  const int64_t R = static_cast<int64_t>(rows.size());
  const int64_t* tg = targets.data_ptr<int64_t>();
  const int64_t* sid = seq_ids.data_ptr<int64_t>();
  T* lse_p = lse.data_ptr<T>();
  std::vector<T> lp(R);
  at::parallel_for(0, R, 16, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf;
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t r = rows[i];
      const T* z = row_as<T>(logits, r, buf);
      const T l = row_lse(z, V);
      lse_p[r] = l;
      lp[i] = nan_if_nonfinite(z[tg[r]] - l);
    }
  });
  std::vector<double> seq_acc(logprob.size(0), 0.0);
  for (int64_t i = 0; i < R; ++i) seq_acc[sid[rows[i]]] += static_cast<double>(lp[i]);
  T* out = logprob.data_ptr<T>();
  for (int64_t s = 0; s < logprob.size(0); ++s) out[s] = nan_if_nonfinite(static_cast<T>(seq_acc[s]));
}

std::tuple<Tensor, Tensor, Tensor> sequence_logprob_fwd(const Tensor& logits_in, const Tensor& targets,
                                                        const Tensor& seq_ids, int64_t num_seqs,
                                                        int64_t ignore_index) {
  check_common(logits_in, targets, seq_ids, "sequence_logprob_fwd");
  TORCH_CHECK_VALUE(num_seqs >= 0, "sequence_logprob_fwd: num_seqs must be >= 0");
  Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = acc_type(logits.scalar_type());
  auto fopt = logits.options().dtype(acc);
  Tensor logprob = at::zeros({num_seqs}, fopt);
  Tensor num_tokens = at::zeros({num_seqs}, logits.options().dtype(at::kLong));
  Tensor lse = at::zeros({N}, fopt);
  Tensor tg = targets.contiguous(), sid = seq_ids.contiguous();
  auto rows = scored_rows(tg, sid, V, num_seqs, ignore_index, N, &num_tokens);
  if (acc == at::kDouble) {
    fwd_impl<double>(logits, tg, sid, rows, logprob, lse);
  } else {
    fwd_impl<float>(logits, tg, sid, rows, logprob, lse);
  }
  return {logprob, num_tokens, lse};
}

template <typename T>
void bwd_impl(const Tensor& grad, const Tensor& logits, const Tensor& targets, const Tensor& seq_ids,
              const Tensor& lse, const std::vector<int64_t>& rows, Tensor& out) {
  const int64_t V = logits.size(1);
  const int64_t R = static_cast<int64_t>(rows.size());
  const int64_t* tg = targets.data_ptr<int64_t>();
  const int64_t* sid = seq_ids.data_ptr<int64_t>();
  const T* lse_p = lse.data_ptr<T>();
  const T* g = grad.data_ptr<T>();
  const bool same = out.scalar_type() == c10::CppTypeToScalarType<T>::value;
  at::parallel_for(0, R, 16, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf, dz(same ? 0 : V);
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t r = rows[i];
      const T* z = row_as<T>(logits, r, buf);
      const T gs = g[sid[r]];
      if (same) {
        T* o = out.data_ptr<T>() + r * V;
        row_neg_softmax(z, o, V, lse_p[r], gs);
        o[tg[r]] += gs;
      } else {
        row_neg_softmax(z, dz.data(), V, lse_p[r], gs);
        dz[tg[r]] += gs;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bwd_store", [&] {
          scalar_t* o = out.data_ptr<scalar_t>() + r * V;
          for (int64_t v = 0; v < V; ++v) o[v] = static_cast<scalar_t>(dz[v]);
        });
      }
    }
  });
}

Tensor sequence_logprob_bwd(const Tensor& grad_logprob, const Tensor& logits_in, const Tensor& targets,
                            const Tensor& seq_ids, const Tensor& lse, int64_t ignore_index) {
  check_common(logits_in, targets, seq_ids, "sequence_logprob_bwd");
  Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t V = logits.size(1);
  const auto acc = acc_type(logits.scalar_type());
  Tensor out = at::zeros(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor tg = targets.contiguous(), sid = seq_ids.contiguous();
  auto rows = scored_rows(tg, sid, V, grad_logprob.size(0), ignore_index, logits.size(0), nullptr);
  Tensor g = grad_logprob.to(acc).contiguous();
  Tensor l = lse.to(acc).contiguous();
  if (acc == at::kDouble) {
    bwd_impl<double>(g, logits, tg, sid, l, rows, out);
  } else {
    bwd_impl<float>(g, logits, tg, sid, l, rows, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(antibody_fast_cpp, m) {
  m.def(
      "linear_sequence_logprob_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor seq_ids, "
      "int num_seqs, int num_grad_rows, float? softcap, int ignore_index, str mode, bool row_stats) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_sequence_logprob_bwd(Tensor grad_logprob, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor targets, Tensor seq_ids, Tensor lse, int num_grad_rows, float? softcap, int ignore_index, "
      "bool need_dh, bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sequence_logprob_fwd(Tensor logits, Tensor targets, Tensor seq_ids, int num_seqs, int ignore_index) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "sequence_logprob_bwd(Tensor grad_logprob, Tensor logits, Tensor targets, Tensor seq_ids, Tensor lse, "
      "int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(antibody_fast_cpp, CPU, m) {
  m.impl("linear_sequence_logprob_fwd", &linear_sequence_logprob_fwd);
  m.impl("linear_sequence_logprob_bwd", &linear_sequence_logprob_bwd);
  m.impl("sequence_logprob_fwd", &sequence_logprob_fwd);
  m.impl("sequence_logprob_bwd", &sequence_logprob_bwd);
}
