// CPU row helpers shared by the fused logit losses (csrc/cpu/kd_loss.cpp, dist_loss.cpp):
// a vectorisable float32 exp, row loads into accumulation buffers, and reductions.
// Hot loops are plain `omp simd` loops over acc_t buffers; the float32 versions are built
// twice (AVX2+FMA and baseline x86-64) and picked at load time (GCC target_clones).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define KDFAST_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define KDFAST_CLONES
#endif
// Row helpers are inlined into the cloned entry points, so they get the clone's ISA.
#define KDFAST_INLINE inline __attribute__((always_inline))

namespace kdfast::rows {

// exp for float32 (Cephes expf polynomial, about 1 ulp), written so that loops over it
// vectorise: no branches, no calls. -inf gives 0, NaN propagates, overflow gives inf.
KDFAST_INLINE float exp_approx(float x) {
  const float clamped = x < -87.5f ? -87.5f : (x > 88.5f ? 88.5f : x);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float poly = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = poly * scale;
  y = x < -87.3f ? 0.0f : y;
  y = x > 88.7f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}
KDFAST_INLINE double exp_approx(double x) { return std::exp(x); }

// buf[c] = scale * x[c] in acc_t (x may be half; columns contiguous).
template <typename scalar_t, typename acc_t>
KDFAST_INLINE void load_row(const scalar_t* x, int64_t n, acc_t scale, acc_t* buf) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<acc_t>(x[c]) * scale;
}

// out[c] = scale * buf[c] rounded to scalar_t.
template <typename scalar_t, typename acc_t>
void store_row(const acc_t* buf, int64_t n, acc_t scale, scalar_t* out) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<scalar_t>(buf[c] * scale);
}

template <typename scalar_t>
void zero_row(int64_t n, scalar_t* out) {
  for (int64_t c = 0; c < n; ++c) out[c] = scalar_t(0);
}

template <typename acc_t>
KDFAST_INLINE acc_t row_max(const acc_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

// A shifted softmax denominator: exp(x - max) sums to `sum`; lse = max + log(sum). The
// sum and the lse are float64 (also for float32 rows): KL subtracts two lses, and their
// float32 rounding alone was 1e-5 of a KL of 0.06 at C = 700.
template <typename acc_t>
struct Lse {
  acc_t max;
  double sum;
  double lse() const { return static_cast<double>(max) + std::log(sum); }
};

// out[c] = exp(x[c] - max(x)); NaN propagates, a +inf entry gives NaN (inf - inf) as
// log_softmax does; an all -inf row gives lse = -inf.
template <typename acc_t>
KDFAST_INLINE Lse<acc_t> exp_row(const acc_t* x, int64_t n, acc_t* out) {
  acc_t m = row_max(x, n);
  if (m == -std::numeric_limits<acc_t>::infinity()) m = 0;
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    out[c] = exp_approx(x[c] - m);
    sum += static_cast<double>(out[c]);
  }
  return {m, sum};
}

// Contiguous columns (stride 1) or a copy; the row stride is kept (expanded rows allowed).
inline at::Tensor unit_column_stride(const at::Tensor& x) {
  return x.stride(1) == 1 ? x : x.contiguous();
}

// Rows per parallel task: enough columns per task to amortise the task overhead.
inline int64_t row_grain(int64_t columns) { return std::max<int64_t>(1, 16384 / columns); }

}  // namespace kdfast::rows
