// C++ CPU kernels of the flat-buffer ops (antibody_fast/ops/flat_ops.py), registered as
// torch.ops.antibody_fast_cpp.flat_*. Parallelised with at::parallel_for (OpenMP backend).
//
// Every op takes lists of 1-D contiguous tensors (one per dtype group). Arithmetic happens in
// at::opmath_type<scalar_t> (fp32 for fp16/bf16/fp32, fp64 for fp64); results are rounded once to the
// storage dtype. Reductions are deterministic: fixed-size blocks (independent of the thread count) are
// reduced in fp32 over short SIMD-friendly runs, accumulated in fp64 within a block, and the block partials
// are summed in order in fp64.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kBlock = 1 << 16;    // elements per reduction block (determinism unit)
constexpr int64_t kRun = 256;          // elements reduced in fp32 before joining the fp64 block sum
constexpr int64_t kGrain = 1 << 15;    // elements per parallel task of the elementwise kernels

void check_list(at::TensorList xs, const char* name) {
  TORCH_CHECK(!xs.empty(), name, ": empty list");
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto& t = xs[i];
    TORCH_CHECK(t.device().is_cpu(), name, "[", i, "]: expected a CPU tensor");
    TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, "[", i, "]: expected a contiguous 1-D tensor");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, "[", i, "]: expected a floating dtype");
  }
}

void check_like(at::TensorList ref, at::TensorList other, const char* name) {
  check_list(other, name);
  TORCH_CHECK(other.size() == ref.size(), name, ": list length mismatch");
  for (size_t i = 0; i < ref.size(); ++i) {
    TORCH_CHECK(other[i].numel() == ref[i].numel() && other[i].scalar_type() == ref[i].scalar_type(), name, "[",
                i, "]: numel/dtype mismatch");
  }
}

// The squared norm is fp32, or fp64 when a buffer is fp64: scalars derived from it are computed in its dtype
// (like the torch reference) and returned as double.
struct SqNorm {
  bool is_fp64;
  double value;
};

SqNorm read_sq(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1, name, ": expected a 1-element CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, ": expected fp32 or fp64");
  if (t.scalar_type() == at::kDouble) return {true, t.contiguous().data_ptr<double>()[0]};
  return {false, static_cast<double>(t.contiguous().data_ptr<float>()[0])};
}

template <typename T>
T perturb_scale_t(T sq, double rho, double eps) {
  return (std::isfinite(sq) && sq > T(0)) ? static_cast<T>(rho) / (std::sqrt(sq) + static_cast<T>(eps)) : T(0);
}

template <typename T>
T clip_coef_t(T sq, double max_norm) {
  T coef = static_cast<T>(max_norm) / (std::sqrt(sq) + static_cast<T>(1e-6));
  if (coef > T(1)) coef = T(1);  // NaN stays NaN, as torch's clamp(max=1)
  return coef;
}

// Sum over [0, n) of f(i) for i in a block, fp32 runs of kRun joined in fp64. F must return acc_t values.
template <int K, typename F>
void block_reduce(int64_t n, F f, double* out) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(nblocks) * K, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      double acc[K] = {};
      for (int64_t r = lo; r < hi; r += kRun) {
        const int64_t re = std::min(hi, r + kRun);
        float run[K] = {};
        f(r, re, run);
        for (int k = 0; k < K; ++k) acc[k] += run[k];
      }
      for (int k = 0; k < K; ++k) partial[b * K + k] = acc[k];
    }
  });
  for (int64_t b = 0; b < nblocks; ++b)
    for (int k = 0; k < K; ++k) out[k] += partial[b * K + k];
}

template <typename scalar_t>
double sq_norm_one(const at::Tensor& x) {
  const scalar_t* p = x.data_ptr<scalar_t>();
  double out[1] = {0.0};
  if constexpr (std::is_same_v<scalar_t, double>) {
    // fp64 input: accumulate in fp64 throughout.
    const int64_t n = x.numel();
    const int64_t nblocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(nblocks, 0.0);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double acc = 0.0;
        const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
#pragma omp simd reduction(+ : acc)
        for (int64_t i = lo; i < hi; ++i) acc += p[i] * p[i];
        partial[b] = acc;
      }
    });
    for (double v : partial) out[0] += v;
  } else {
    block_reduce<1>(
        x.numel(),
        [p](int64_t lo, int64_t hi, float* run) {
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = lo; i < hi; ++i) {
            const float v = static_cast<float>(p[i]);
            s += v * v;
          }
          run[0] = s;
        },
        out);
  }
  return out[0];
}

at::Tensor flat_sq_norm(at::TensorList xs) {
  check_list(xs, "flat_sq_norm: xs");
  double total = 0.0;
  bool any_fp64 = false;
  for (const auto& x : xs) {
    any_fp64 = any_fp64 || x.scalar_type() == at::kDouble;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flat_sq_norm",
                                    [&] { total += sq_norm_one<scalar_t>(x); });
  }
  if (any_fp64) return at::scalar_tensor(total, xs[0].options().dtype(at::kDouble));
  return at::scalar_tensor(static_cast<float>(total), xs[0].options().dtype(at::kFloat));
}

template <typename scalar_t>
void grad_dots_one(const at::Tensor& a, const at::Tensor& h, const at::Tensor& p, double* out) {
  const scalar_t* pa = a.data_ptr<scalar_t>();
  const scalar_t* ph = h.data_ptr<scalar_t>();
  const scalar_t* pp = p.data_ptr<scalar_t>();
  if constexpr (std::is_same_v<scalar_t, double>) {
    const int64_t n = a.numel();
    const int64_t nblocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(nblocks * 3, 0.0);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double d = 0.0, aa = 0.0, ss = 0.0;
        const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
#pragma omp simd reduction(+ : d, aa, ss)
        for (int64_t i = lo; i < hi; ++i) {
          const double s = ph[i] - pp[i];
          d += pa[i] * s;
          aa += pa[i] * pa[i];
          ss += s * s;
        }
        partial[b * 3] = d;
        partial[b * 3 + 1] = aa;
        partial[b * 3 + 2] = ss;
      }
    });
    for (int64_t b = 0; b < nblocks; ++b)
      for (int k = 0; k < 3; ++k) out[k] += partial[b * 3 + k];
  } else {
    block_reduce<3>(
        a.numel(),
        [=](int64_t lo, int64_t hi, float* run) {
          float d = 0.f, aa = 0.f, ss = 0.f;
#pragma omp simd reduction(+ : d, aa, ss)
          for (int64_t i = lo; i < hi; ++i) {
            const float va = static_cast<float>(pa[i]);
            const float s = static_cast<float>(ph[i]) - static_cast<float>(pp[i]);
            d += va * s;
            aa += va * va;
            ss += s * s;
          }
          run[0] = d;
          run[1] = aa;
          run[2] = ss;
        },
        out);
  }
}

at::Tensor flat_grad_dots(at::TensorList a, at::TensorList h, at::TensorList p) {
  check_list(a, "flat_grad_dots: g_a");
  check_like(a, h, "flat_grad_dots: g_h");
  check_like(a, p, "flat_grad_dots: g_p");
  double acc[3] = {0.0, 0.0, 0.0};
  for (size_t k = 0; k < a.size(); ++k) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[k].scalar_type(), "flat_grad_dots",
                                    [&] { grad_dots_one<scalar_t>(a[k], h[k], p[k], acc); });
  }
  auto out = at::empty({3}, a[0].options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int k = 0; k < 3; ++k) o[k] = static_cast<float>(acc[k]);
  return out;
}

at::Tensor flat_perturb(at::TensorList theta, at::TensorList backup, at::TensorList g, const at::Tensor& sq_norm,
                        double rho, double eps) {
  check_list(theta, "flat_perturb: theta");
  check_like(theta, backup, "flat_perturb: backup");
  check_like(theta, g, "flat_perturb: g");
  const SqNorm sq = read_sq(sq_norm, "flat_perturb: sq_norm");
  const bool finite = std::isfinite(sq.value);
  const double scale = sq.is_fp64 ? perturb_scale_t<double>(sq.value, rho, eps)
                                  : static_cast<double>(perturb_scale_t<float>(static_cast<float>(sq.value), rho, eps));
  for (size_t k = 0; k < theta.size(); ++k) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta[k].scalar_type(), "flat_perturb", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* pt = theta[k].data_ptr<scalar_t>();
      scalar_t* pb = backup[k].data_ptr<scalar_t>();
      const scalar_t* pg = g[k].data_ptr<scalar_t>();
      const acc_t s = static_cast<acc_t>(scale);
      at::parallel_for(0, theta[k].numel(), kGrain, [&](int64_t lo, int64_t hi) {
        std::memcpy(pb + lo, pt + lo, sizeof(scalar_t) * (hi - lo));
        if (s == acc_t(0)) return;  // zero or non-finite norm: theta unchanged
        for (int64_t i = lo; i < hi; ++i)
          pt[i] = static_cast<scalar_t>(static_cast<acc_t>(pt[i]) - s * static_cast<acc_t>(pg[i]));
      });
    });
  }
  return at::scalar_tensor(!finite, sq_norm.options().dtype(at::kBool));
}

void flat_restore(at::TensorList theta, at::TensorList backup) {
  check_list(theta, "flat_restore: theta");
  check_like(theta, backup, "flat_restore: backup");
  for (size_t k = 0; k < theta.size(); ++k) {
    char* dst = static_cast<char*>(theta[k].data_ptr());
    const char* src = static_cast<const char*>(backup[k].data_ptr());
    const int64_t item = theta[k].element_size();
    at::parallel_for(0, theta[k].numel(), kGrain, [&](int64_t lo, int64_t hi) {
      std::memcpy(dst + lo * item, src + lo * item, static_cast<size_t>((hi - lo) * item));
    });
  }
}

void flat_combine(at::TensorList out, at::TensorList a, at::TensorList h, at::TensorList p, at::TensorList r,
                  const std::optional<at::Tensor>& lambda_t, double lambda_t_value,
                  const std::optional<at::Tensor>& lambda_ref, double lambda_ref_value) {
  check_list(out, "flat_combine: out");
  check_like(out, a, "flat_combine: g_a");
  check_like(out, h, "flat_combine: g_h");
  check_like(out, p, "flat_combine: g_p");
  const bool has_r = !r.empty();
  if (has_r) check_like(out, r, "flat_combine: g_r");
  for (size_t k = 0; k < out.size(); ++k) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out[k].scalar_type(), "flat_combine", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto read = [](const std::optional<at::Tensor>& t, double v) -> acc_t {
        if (!t.has_value()) return static_cast<acc_t>(v);
        TORCH_CHECK(t->device().is_cpu() && t->numel() == 1, "flat_combine: lambda must be a 1-element CPU tensor");
        return t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous().template data_ptr<acc_t>()[0];
      };
      const acc_t lt = read(lambda_t, lambda_t_value);
      const acc_t lr = read(lambda_ref, lambda_ref_value);
      scalar_t* po = out[k].data_ptr<scalar_t>();
      const scalar_t* pa = a[k].data_ptr<scalar_t>();
      const scalar_t* ph = h[k].data_ptr<scalar_t>();
      const scalar_t* pp = p[k].data_ptr<scalar_t>();
      const scalar_t* pr = has_r ? r[k].data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, out[k].numel(), kGrain, [&](int64_t lo, int64_t hi) {
        if (pr != nullptr) {
          for (int64_t i = lo; i < hi; ++i) {
            const acc_t v = static_cast<acc_t>(pa[i]) +
                            lt * (static_cast<acc_t>(ph[i]) - static_cast<acc_t>(pp[i]));
            po[i] = static_cast<scalar_t>(v + lr * static_cast<acc_t>(pr[i]));
          }
        } else {
          for (int64_t i = lo; i < hi; ++i)
            po[i] = static_cast<scalar_t>(static_cast<acc_t>(pa[i]) +
                                          lt * (static_cast<acc_t>(ph[i]) - static_cast<acc_t>(pp[i])));
        }
      });
    });
  }
}

at::Tensor flat_clip_scale(at::TensorList g, const at::Tensor& sq_norm, double max_norm) {
  check_list(g, "flat_clip_scale: g");
  const SqNorm sq = read_sq(sq_norm, "flat_clip_scale: sq_norm");
  const double norm = std::sqrt(sq.value);
  const double coef = sq.is_fp64 ? clip_coef_t<double>(sq.value, max_norm)
                                 : static_cast<double>(clip_coef_t<float>(static_cast<float>(sq.value), max_norm));
  if (coef != 1.0) {  // coef == 1 is the identity (and then every element is finite): skip the pass
    for (size_t k = 0; k < g.size(); ++k) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g[k].scalar_type(), "flat_clip_scale", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* px = g[k].data_ptr<scalar_t>();
        const acc_t c = static_cast<acc_t>(coef);
        at::parallel_for(0, g[k].numel(), kGrain, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) px[i] = static_cast<scalar_t>(static_cast<acc_t>(px[i]) * c);
        });
      });
    }
  }
  return at::scalar_tensor(static_cast<float>(norm), sq_norm.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(antibody_fast_cpp, m) {
  m.def("flat_sq_norm(Tensor[] xs) -> Tensor", &flat_sq_norm);
  m.def("flat_grad_dots(Tensor[] g_a, Tensor[] g_h, Tensor[] g_p) -> Tensor", &flat_grad_dots);
  m.def("flat_perturb(Tensor(a!)[] theta, Tensor(b!)[] backup, Tensor[] g, Tensor sq_norm, float rho, float eps) "
        "-> Tensor",
        &flat_perturb);
  m.def("flat_restore(Tensor(a!)[] theta, Tensor[] backup) -> ()", &flat_restore);
  m.def("flat_combine(Tensor(a!)[] out, Tensor[] g_a, Tensor[] g_h, Tensor[] g_p, Tensor[] g_r, Tensor? lambda_t, "
        "float lambda_t_value, Tensor? lambda_ref, float lambda_ref_value) -> ()",
        &flat_combine);
  m.def("flat_clip_scale(Tensor(a!)[] g, Tensor sq_norm, float max_norm) -> Tensor", &flat_clip_scale);
}
