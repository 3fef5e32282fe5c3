// C++ CPU kernels of the flat-buffer ops (antibody_fast/ops/flat_ops/), registered as
// torch.ops.antibody_fast_cpp.<op> under the op's one name (sq_norm, grad_dots, perturb_, restore_,
// antibody_combine_, clip_). Parallelised with at::parallel_for (OpenMP backend).
//
// Every op takes lists of 1-D contiguous tensors (one per dtype group). Arithmetic happens in fp32 for
// fp16/bf16/fp32 and in fp64 for fp64; results are rounded once to the storage dtype.
//
// Reductions are deterministic (independent of the thread count and of the instruction set): fixed blocks
// of kBlock elements are split into runs of kRun elements reduced over kLanes fixed accumulator lanes (a
// 16-lane vector-extension accumulator), each run is folded into an fp64 block sum, and the block sums are
// added in order in fp64.
//
// The hot loops are compiled twice (AVX2 and baseline x86-64) and chosen at run time; no FMA contraction
// (ISO C++ mode), so both versions give bit-identical results.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
// The 32-byte vector helpers are only ever inlined into the AVX2 functions; the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

using at::Tensor;

#if defined(__x86_64__) && defined(__GNUC__)
#define AF_HAS_AVX2_PATH 1
#define AF_TARGET_AVX2 __attribute__((target("avx2")))
// ANTIBODY_FAST_CPP_NO_AVX2=1 forces the baseline build (tests check that both give bit-identical results).
bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && std::getenv("ANTIBODY_FAST_CPP_NO_AVX2") == nullptr;
  return ok;
}
#else
#define AF_HAS_AVX2_PATH 0
#endif

constexpr int64_t kBlock = 1 << 16;  // elements per reduction block (the determinism unit)
constexpr int64_t kRun = 1024;       // elements reduced in the accumulation dtype before the fp64 fold
constexpr int kLanes = 16;           // independent accumulator lanes
constexpr int64_t kGrain = 1 << 15;  // elements per parallel task of the elementwise kernels

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
AF_INLINE acc_of<T> up(T v) {
  return static_cast<acc_of<T>>(v);
}

// ---------------------------------------------------------------------------------------------- bodies
// Reductions use GCC/Clang vector extensions of the native width W (16 bytes: SSE, baseline x86-64; 32 bytes:
// the AVX2 build): kLanes / NV accumulator vectors, lane l summing the elements i = l (mod kLanes) of a run,
// lanes folded in order -- the same arithmetic, bit for bit, whatever the ISA.
typedef float v4f __attribute__((vector_size(16)));
typedef double v2d __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
template <typename A, int W>
struct VecOf;
template <>
struct VecOf<float, 16> {
  using type = v4f;
};
template <>
struct VecOf<double, 16> {
  using type = v2d;
};
template <>
struct VecOf<float, 32> {
  using type = v8f;
};
template <>
struct VecOf<double, 32> {
  using type = v4d;
};
template <typename T, int W>
using vec_of = typename VecOf<acc_of<T>, W>::type;
template <typename T, int W>
constexpr int kNV = W / sizeof(acc_of<T>);  // lanes per vector
template <typename T, int W>
constexpr int kNAcc = kLanes / kNV<T, W>;  // accumulator vectors

template <int W, typename T>
AF_INLINE vec_of<T, W> loadv(const T* p) {
  vec_of<T, W> v;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int l = 0; l < kNV<T, W>; ++l) v[l] = static_cast<float>(p[l]);
  }
  return v;
}

template <int W, typename T>
AF_INLINE double fold(const vec_of<T, W>* acc) {
  double s = 0.0;
  for (int j = 0; j < kNAcc<T, W>; ++j)
    for (int l = 0; l < kNV<T, W>; ++l) s += static_cast<double>(acc[j][l]);
  return s;
}

// sum of x^2 over [lo, hi) (hi - lo <= kBlock), folded per run into fp64
template <int W, typename T>
AF_INLINE double sumsq_body(const T* __restrict x, int64_t lo, int64_t hi) {
  using A = acc_of<T>;
  using V = vec_of<T, W>;
  constexpr int NV = kNV<T, W>, NA = kNAcc<T, W>;
  double total = 0.0;
  for (int64_t r = lo; r < hi; r += kRun) {
    const int64_t re = std::min(hi, r + kRun);
    V acc[NA] = {};
    int64_t i = r;
    for (; i + kLanes <= re; i += kLanes) {
#pragma GCC unroll 16
      for (int j = 0; j < NA; ++j) {
        const V v = loadv<W>(x + i + j * NV);
        acc[j] += v * v;
      }
    }
    double s = fold<W, T>(acc);
    for (; i < re; ++i) {
      const A v = up(x[i]);
      s += static_cast<double>(v * v);
    }
    total += s;
  }
  return total;
}

// (<a, h-p>, |a|^2, |h-p|^2) over [lo, hi)
template <int W, typename T>
AF_INLINE void dots_body(const T* __restrict a, const T* __restrict h, const T* __restrict p, int64_t lo,
                         int64_t hi, double* out) {
  using A = acc_of<T>;
  using V = vec_of<T, W>;
  constexpr int NV = kNV<T, W>, NA = kNAcc<T, W>;
  for (int64_t r = lo; r < hi; r += kRun) {
    const int64_t re = std::min(hi, r + kRun);
    V d[NA] = {}, aa[NA] = {}, ss[NA] = {};
    int64_t i = r;
    for (; i + kLanes <= re; i += kLanes) {
#pragma GCC unroll 16
      for (int j = 0; j < NA; ++j) {
        const int64_t o = i + j * NV;
        const V va = loadv<W>(a + o);
        const V vs = loadv<W>(h + o) - loadv<W>(p + o);
        d[j] += va * vs;
        aa[j] += va * va;
        ss[j] += vs * vs;
      }
    }
    double sd = fold<W, T>(d), sa = fold<W, T>(aa), sss = fold<W, T>(ss);
    for (; i < re; ++i) {
      const A va = up(a[i]);
      const A s = up(h[i]) - up(p[i]);
      sd += static_cast<double>(va * s);
      sa += static_cast<double>(va * va);
      sss += static_cast<double>(s * s);
    }
    out[0] += sd;
    out[1] += sa;
    out[2] += sss;
  }
}

// theta[i] <- theta[i] - s * g[i] over [lo, hi)
template <typename T>
AF_INLINE void axpy_body(T* __restrict t, const T* __restrict g, int64_t lo, int64_t hi, acc_of<T> s) {
  for (int64_t i = lo; i < hi; ++i) t[i] = static_cast<T>(up(t[i]) - s * up(g[i]));
}

// o[i] <- a[i] + lt * (h[i] - p[i]) (+ lr * r[i]); o may alias a (hence no __restrict on o / a)
template <typename T>
AF_INLINE void combine_body(T* o, const T* a, const T* __restrict h, const T* __restrict p, const T* __restrict r,
                            int64_t lo, int64_t hi, acc_of<T> lt, acc_of<T> lr) {
  if (r != nullptr) {
    for (int64_t i = lo; i < hi; ++i) {
      const acc_of<T> v = up(a[i]) + lt * (up(h[i]) - up(p[i]));
      o[i] = static_cast<T>(v + lr * up(r[i]));
    }
  } else {
    for (int64_t i = lo; i < hi; ++i) o[i] = static_cast<T>(up(a[i]) + lt * (up(h[i]) - up(p[i])));
  }
}

template <typename T>
AF_INLINE void scale_body(T* __restrict x, int64_t lo, int64_t hi, acc_of<T> c) {
  for (int64_t i = lo; i < hi; ++i) x[i] = static_cast<T>(up(x[i]) * c);
}

// ---------------------------------------------------------------------------------------------- dispatch
// One baseline and one AVX2 instance of every body per dtype; `Kern<T>` picks at run time.
#if AF_HAS_AVX2_PATH
#define AF_DEFINE_KERNELS(T, SUF)                                                                            \
  double sumsq_##SUF(const T* x, int64_t lo, int64_t hi) { return sumsq_body<16>(x, lo, hi); }                    \
  AF_TARGET_AVX2 double sumsq_avx2_##SUF(const T* x, int64_t lo, int64_t hi) { return sumsq_body<32>(x, lo, hi); } \
  void dots_##SUF(const T* a, const T* h, const T* p, int64_t lo, int64_t hi, double* o) {                    \
    dots_body<16>(a, h, p, lo, hi, o);                                                                        \
  }                                                                                                           \
  AF_TARGET_AVX2 void dots_avx2_##SUF(const T* a, const T* h, const T* p, int64_t lo, int64_t hi, double* o) { \
    dots_body<32>(a, h, p, lo, hi, o);                                                                        \
  }                                                                                                           \
  void axpy_##SUF(T* t, const T* g, int64_t lo, int64_t hi, acc_of<T> s) { axpy_body(t, g, lo, hi, s); }     \
  AF_TARGET_AVX2 void axpy_avx2_##SUF(T* t, const T* g, int64_t lo, int64_t hi, acc_of<T> s) {                \
    axpy_body(t, g, lo, hi, s);                                                                               \
  }                                                                                                           \
  void combine_##SUF(T* o, const T* a, const T* h, const T* p, const T* r, int64_t lo, int64_t hi,           \
                     acc_of<T> lt, acc_of<T> lr) {                                                            \
    combine_body(o, a, h, p, r, lo, hi, lt, lr);                                                              \
  }                                                                                                           \
  AF_TARGET_AVX2 void combine_avx2_##SUF(T* o, const T* a, const T* h, const T* p, const T* r, int64_t lo,    \
                                         int64_t hi, acc_of<T> lt, acc_of<T> lr) {                            \
    combine_body(o, a, h, p, r, lo, hi, lt, lr);                                                              \
  }                                                                                                           \
  void scale_##SUF(T* x, int64_t lo, int64_t hi, acc_of<T> c) { scale_body(x, lo, hi, c); }                  \
  AF_TARGET_AVX2 void scale_avx2_##SUF(T* x, int64_t lo, int64_t hi, acc_of<T> c) { scale_body(x, lo, hi, c); }
#define AF_PICK(name, SUF) (cpu_has_avx2() ? name##_avx2_##SUF : name##_##SUF)
#else
#define AF_DEFINE_KERNELS(T, SUF)                                                                            \
  double sumsq_##SUF(const T* x, int64_t lo, int64_t hi) { return sumsq_body<16>(x, lo, hi); }                    \
  void dots_##SUF(const T* a, const T* h, const T* p, int64_t lo, int64_t hi, double* o) {                    \
    dots_body<16>(a, h, p, lo, hi, o);                                                                        \
  }                                                                                                           \
  void axpy_##SUF(T* t, const T* g, int64_t lo, int64_t hi, acc_of<T> s) { axpy_body(t, g, lo, hi, s); }     \
  void combine_##SUF(T* o, const T* a, const T* h, const T* p, const T* r, int64_t lo, int64_t hi,           \
                     acc_of<T> lt, acc_of<T> lr) {                                                            \
    combine_body(o, a, h, p, r, lo, hi, lt, lr);                                                              \
  }                                                                                                           \
  void scale_##SUF(T* x, int64_t lo, int64_t hi, acc_of<T> c) { scale_body(x, lo, hi, c); }
#define AF_PICK(name, SUF) (name##_##SUF)
#endif

AF_DEFINE_KERNELS(float, f32)
AF_DEFINE_KERNELS(double, f64)
AF_DEFINE_KERNELS(c10::Half, f16)
AF_DEFINE_KERNELS(c10::BFloat16, bf16)

template <typename T>
struct Kern;
#define AF_KERN(T, SUF)                                                                                 \
  template <>                                                                                          \
  struct Kern<T> {                                                                                     \
    static auto sumsq() { return AF_PICK(sumsq, SUF); }                                                \
    static auto dots() { return AF_PICK(dots, SUF); }                                                  \
    static auto axpy() { return AF_PICK(axpy, SUF); }                                                  \
    static auto combine() { return AF_PICK(combine, SUF); }                                            \
    static auto scale() { return AF_PICK(scale, SUF); }                                                \
  };
AF_KERN(float, f32)
AF_KERN(double, f64)
AF_KERN(c10::Half, f16)
AF_KERN(c10::BFloat16, bf16)

#define AF_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------- checks
void check_list(at::TensorList xs, const char* name) {
  TORCH_CHECK_VALUE(!xs.empty(), name, ": empty list");
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto& t = xs[i];
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, "[", i, "]: expected a CPU tensor");
    TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name, "[", i, "]: expected a contiguous 1-D tensor");
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, "[", i, "]: expected a floating dtype");
  }
}

void check_like(at::TensorList ref, at::TensorList other, const char* name) {
  check_list(other, name);
  TORCH_CHECK_VALUE(other.size() == ref.size(), name, ": list length mismatch");
  for (size_t i = 0; i < ref.size(); ++i) {
    TORCH_CHECK_VALUE(other[i].numel() == ref[i].numel() && other[i].scalar_type() == ref[i].scalar_type(),
                      name, "[", i, "]: numel/dtype mismatch");
  }
}

// The squared norm is fp32, or fp64 when a buffer is fp64: scalars derived from it are computed in its dtype
// (like the torch reference) and returned as double.
struct SqNorm {
  bool is_fp64;
  double value;
};

SqNorm read_sq(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.numel() == 1, name, ": expected a 1-element CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, ": expected fp32/fp64");
  if (t.scalar_type() == at::kDouble) return {true, t.contiguous().data_ptr<double>()[0]};
  return {false, static_cast<double>(t.contiguous().data_ptr<float>()[0])};
}

template <typename S>
S perturb_scale_t(S sq, double rho, double eps) {
  return (std::isfinite(sq) && sq > S(0)) ? static_cast<S>(rho) / (std::sqrt(sq) + static_cast<S>(eps)) : S(0);
}

template <typename S>
S clip_coef_t(S sq, double max_norm) {
  S coef = static_cast<S>(max_norm) / (std::sqrt(sq) + static_cast<S>(1e-6));
  if (coef > S(1)) coef = S(1);  // NaN stays NaN, as torch's clamp(max=1)
  return coef;
}

// ---------------------------------------------------------------------------------------------- reductions
// Sum over blocks of `block_fn(lo, hi, out[K])`, deterministic: block results added in order.
template <int K, typename F>
void reduce_blocks(int64_t n, F block_fn, double* out) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(nblocks) * K, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block_fn(b * kBlock, std::min(n, (b + 1) * kBlock), &partial[b * K]);
  });
  for (int64_t b = 0; b < nblocks; ++b)
    for (int k = 0; k < K; ++k) out[k] += partial[b * K + k];
}

Tensor sq_norm(at::TensorList xs) {
  check_list(xs, "sq_norm: xs");
  double total = 0.0;
  bool any_fp64 = false;
  for (const auto& x : xs) {
    any_fp64 = any_fp64 || x.scalar_type() == at::kDouble;
    AF_DISPATCH(x.scalar_type(), "sq_norm", [&] {
      const scalar_t* p = x.data_ptr<scalar_t>();
      const auto fn = Kern<scalar_t>::sumsq();
      reduce_blocks<1>(x.numel(), [&](int64_t lo, int64_t hi, double* o) { o[0] += fn(p, lo, hi); }, &total);
    });
  }
  if (any_fp64) return at::scalar_tensor(total, xs[0].options().dtype(at::kDouble));
  return at::scalar_tensor(static_cast<float>(total), xs[0].options().dtype(at::kFloat));
}

Tensor grad_dots(at::TensorList a, at::TensorList h, at::TensorList p) {
  check_list(a, "grad_dots: g_a");
  check_like(a, h, "grad_dots: g_h");
  check_like(a, p, "grad_dots: g_p");
  double acc[3] = {0.0, 0.0, 0.0};
  for (size_t k = 0; k < a.size(); ++k) {
    AF_DISPATCH(a[k].scalar_type(), "grad_dots", [&] {
      const scalar_t* pa = a[k].data_ptr<scalar_t>();
      const scalar_t* ph = h[k].data_ptr<scalar_t>();
      const scalar_t* pp = p[k].data_ptr<scalar_t>();
      const auto fn = Kern<scalar_t>::dots();
      reduce_blocks<3>(a[k].numel(), [&](int64_t lo, int64_t hi, double* o) { fn(pa, ph, pp, lo, hi, o); }, acc);
    });
  }
  auto out = at::empty({3}, a[0].options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int k = 0; k < 3; ++k) o[k] = static_cast<float>(acc[k]);
  return out;
}

// ---------------------------------------------------------------------------------------------- elementwise
Tensor perturb_(at::TensorList theta, at::TensorList backup, at::TensorList g, const Tensor& sq_norm, double rho,
                    double eps) {
  check_list(theta, "perturb_: theta");
  check_like(theta, backup, "perturb_: backup");
  check_like(theta, g, "perturb_: g");
  const SqNorm sq = read_sq(sq_norm, "perturb_: sq_norm");
  const bool finite = std::isfinite(sq.value);
  const double scale = sq.is_fp64 ? perturb_scale_t<double>(sq.value, rho, eps)
                                  : static_cast<double>(perturb_scale_t<float>(static_cast<float>(sq.value), rho, eps));
  for (size_t k = 0; k < theta.size(); ++k) {
    AF_DISPATCH(theta[k].scalar_type(), "perturb_", [&] {
      scalar_t* pt = theta[k].data_ptr<scalar_t>();
      scalar_t* pb = backup[k].data_ptr<scalar_t>();
      const scalar_t* pg = g[k].data_ptr<scalar_t>();
      const auto s = static_cast<acc_of<scalar_t>>(scale);
      const auto fn = Kern<scalar_t>::axpy();
      at::parallel_for(0, theta[k].numel(), kGrain, [&](int64_t lo, int64_t hi) {
        std::memcpy(pb + lo, pt + lo, sizeof(scalar_t) * (hi - lo));  // bitwise backup (chunk stays in cache)
        if (s != 0) fn(pt, pg, lo, hi, s);  // zero or non-finite norm: theta untouched
      });
    });
  }
  return at::scalar_tensor(!finite, sq_norm.options().dtype(at::kBool));
}

void restore_(at::TensorList theta, at::TensorList backup) {
  check_list(theta, "restore_: theta");
  check_like(theta, backup, "restore_: backup");
  for (size_t k = 0; k < theta.size(); ++k) {
    char* dst = static_cast<char*>(theta[k].data_ptr());
    const char* src = static_cast<const char*>(backup[k].data_ptr());
    const int64_t item = theta[k].element_size();
    at::parallel_for(0, theta[k].numel(), kGrain, [&](int64_t lo, int64_t hi) {
      std::memcpy(dst + lo * item, src + lo * item, static_cast<size_t>((hi - lo) * item));
    });
  }
}

void antibody_combine_(at::TensorList out, at::TensorList a, at::TensorList h, at::TensorList p, at::TensorList r,
                  const std::optional<Tensor>& lambda_t, double lambda_t_value, const std::optional<Tensor>& lambda_ref,
                  double lambda_ref_value) {
  check_list(out, "antibody_combine_: out");
  check_like(out, a, "antibody_combine_: g_a");
  check_like(out, h, "antibody_combine_: g_h");
  check_like(out, p, "antibody_combine_: g_p");
  const bool has_r = !r.empty();
  if (has_r) check_like(out, r, "antibody_combine_: g_r");
  for (size_t k = 0; k < out.size(); ++k) {
    AF_DISPATCH(out[k].scalar_type(), "antibody_combine_", [&] {
      using A = acc_of<scalar_t>;
      auto read = [](const std::optional<Tensor>& t, double v) -> A {
        if (!t.has_value()) return static_cast<A>(v);
        TORCH_CHECK_VALUE(t->device().is_cpu() && t->numel() == 1, "antibody_combine_: lambda must be a 1-element CPU tensor");
        return t->to(c10::CppTypeToScalarType<A>::value).contiguous().template data_ptr<A>()[0];
      };
      const A lt = read(lambda_t, lambda_t_value);
      const A lr = read(lambda_ref, lambda_ref_value);
      scalar_t* po = out[k].data_ptr<scalar_t>();
      const scalar_t* pa = a[k].data_ptr<scalar_t>();
      const scalar_t* ph = h[k].data_ptr<scalar_t>();
      const scalar_t* pp = p[k].data_ptr<scalar_t>();
      const scalar_t* pr = has_r ? r[k].data_ptr<scalar_t>() : nullptr;
      const auto fn = Kern<scalar_t>::combine();
      at::parallel_for(0, out[k].numel(), kGrain,
                       [&](int64_t lo, int64_t hi) { fn(po, pa, ph, pp, pr, lo, hi, lt, lr); });
    });
  }
}

Tensor clip_(at::TensorList g, const Tensor& sq_norm, double max_norm) {
  check_list(g, "clip_: g");
  const SqNorm sq = read_sq(sq_norm, "clip_: sq_norm");
  const double norm = std::sqrt(sq.value);
  const double coef = sq.is_fp64 ? clip_coef_t<double>(sq.value, max_norm)
                                 : static_cast<double>(clip_coef_t<float>(static_cast<float>(sq.value), max_norm));
  if (coef != 1.0) {  // coef == 1 is the identity (and then every element is finite): skip the pass
    for (size_t k = 0; k < g.size(); ++k) {
      AF_DISPATCH(g[k].scalar_type(), "clip_", [&] {
        scalar_t* px = g[k].data_ptr<scalar_t>();
        const auto c = static_cast<acc_of<scalar_t>>(coef);
        const auto fn = Kern<scalar_t>::scale();
        at::parallel_for(0, g[k].numel(), kGrain, [&](int64_t lo, int64_t hi) { fn(px, lo, hi, c); });
      });
    }
  }
  return at::scalar_tensor(static_cast<float>(norm), sq_norm.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(antibody_fast_cpp, m) {
  m.def("sq_norm(Tensor[] xs) -> Tensor");
  m.def("grad_dots(Tensor[] g_a, Tensor[] g_h, Tensor[] g_p) -> Tensor");
  m.def("perturb_(Tensor(a!)[] theta, Tensor(b!)[] backup, Tensor[] g, Tensor sq_norm, float rho, float eps) -> Tensor");
  m.def("restore_(Tensor(a!)[] theta, Tensor[] backup) -> ()");
  m.def("antibody_combine_(Tensor(a!)[] out, Tensor[] g_a, Tensor[] g_h, Tensor[] g_p, Tensor[] g_r, Tensor? lambda_t, "
        "float lambda_t_value, Tensor? lambda_ref, float lambda_ref_value) -> ()");
  m.def("clip_(Tensor(a!)[] g, Tensor sq_norm, float max_norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(antibody_fast_cpp, CPU, m) {
  m.impl("sq_norm", &sq_norm);
  m.impl("grad_dots", &grad_dots);
  m.impl("perturb_", &perturb_);
  m.impl("restore_", &restore_);
  m.impl("antibody_combine_", &antibody_combine_);
  m.impl("clip_", &clip_);
}
