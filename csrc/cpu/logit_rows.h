// CPU row helpers shared by the fused logit losses (csrc/cpu/kd_loss.cpp, dist_loss.cpp):
// a vectorisable float32 exp, row loads into accumulation buffers, and reductions.
// Hot loops are plain `omp simd` loops over acc_t buffers; the float32 row kernels are built
// twice (AVX2+FMA and baseline x86-64) and picked at run time by KDFAST_ROW_DISPATCH
// (csrc/cpu/isa_dispatch.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "isa_dispatch.h"
#include "output_pool.h"

namespace kdfast::rows {

// std::bit_cast is C++20, and older torch builds extensions as C++17 (torch 2.11 does, seen
// on a GPU machine; 2.14 builds them as C++20). The builtin is what std::bit_cast is made of in GCC >= 11,
// Clang >= 9 and MSVC >= 19.27, in either standard, and keeps the loops vectorisable.
template <class To, class From>
KDFAST_INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  return __builtin_bit_cast(To, from);
}

using ::kdfast::isa::cpu_has_avx2_fma;

// exp for float32 (Cephes expf polynomial, about 1 ulp), written so that loops over it
// vectorise: no branches, no calls. -inf gives 0, NaN propagates (every comparison below is
// false for NaN, so the NaN flows through the clamp and the arithmetic), overflow gives inf
// unless kNonPositive: callers that only pass x <= 0 (or NaN), the shifted softmax
// exponents, skip that select (2 of the loop's ~21 vector instructions).
template <bool kNonPositive = false>
KDFAST_INLINE float exp_approx(float x) {
  const float clamped = x < -87.5f ? -87.5f : (x > 88.5f ? 88.5f : x);
  // n = round(clamped / ln 2) by the 1.5 * 2^23 trick (|n| < 2^22): no floor call, so the
  // loop also vectorises without SSE4.1.
  constexpr float kRound = 12582912.0f;
  const float shifted = clamped * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const float r = clamped - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float poly = p * r * r + r + 1.0f;
  // 2^n from the integer in the low mantissa bits of `shifted` (no float -> int conversion)
  const int32_t bits =
      (bit_cast<int32_t>(shifted) - bit_cast<int32_t>(kRound) + 127) << 23;
  float y = poly * bit_cast<float>(bits);  // bit_cast, not memcpy: keeps it vectorisable
  y = x < -87.3f ? 0.0f : y;
  if constexpr (!kNonPositive) y = x > 88.7f ? std::numeric_limits<float>::infinity() : y;
  return y;
}
template <bool kNonPositive = false>
KDFAST_INLINE double exp_approx(double x) {
  return std::exp(x);
}

// Rows of logits (B, C) or (N, C, S), read in place (semantics 0: class dim 1, row r = n S + s,
// no permuted copy): row r starts at (r / S) stride_n + (r % S) stride_s and its C entries
// are stride_c apart (1 for 2-D inputs after unit_column_stride(), S for contiguous 3-D).
template <typename T>
struct RowView {
  T* data;
  int64_t spatial, stride_n, stride_s, stride_c;
  T* row(int64_t r) const { return data + (r / spatial) * stride_n + (r % spatial) * stride_s; }
};

template <typename T>
RowView<T> row_view(const at::Tensor& x, T* data) {
  if (x.dim() < 2) return {data, 1, 0, 0, 1};  // an unrequested (0,) gradient
  if (x.dim() == 2) return {data, 1, x.stride(0), 0, x.stride(1)};
  return {data, x.size(2), x.stride(0), x.stride(2), x.stride(1)};
}

// Number of rows of (B, C) or (N, C, S) logits.
inline int64_t row_count(const at::Tensor& x) {
  return x.dim() == 2 ? x.size(0) : x.size(0) * x.size(2);
}

// buf[c] = scale * x[c * stride] in acc_t (x may be half).
template <typename scalar_t, typename acc_t>
KDFAST_INLINE void load_row(const scalar_t* x, int64_t n, int64_t stride, acc_t scale,
                            acc_t* buf) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<acc_t>(x[c]) * scale;
    return;
  }
  for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<acc_t>(x[c * stride]) * scale;
}

// out[c * stride] = scale * buf[c] rounded to scalar_t.
template <typename scalar_t, typename acc_t>
void store_row(const acc_t* buf, int64_t n, acc_t scale, scalar_t* out, int64_t stride) {
  for (int64_t c = 0; c < n; ++c) out[c * stride] = static_cast<scalar_t>(buf[c] * scale);
}

template <typename scalar_t>
void zero_row(int64_t n, scalar_t* out, int64_t stride) {
  for (int64_t c = 0; c < n; ++c) out[c * stride] = scalar_t(0);
}

// Rows in runs: the callers fetch consecutive rows a run at a time, into buffers of n
// entries per row. For (N, C, S) logits a run is up to kRunRows rows of one n (consecutive
// s), fetched as a (C, run) block read along s, so each cache line of the input is used
// whole at once instead of one entry per row (with S a power of two the C entries of a row
// also fall into one cache set); (B, C) rows come one at a time (a run of 1). A run holds
// at most kRunElements entries per buffer, so that the buffers stay in the L1 / L2 caches.
constexpr int64_t kRunRows = 16;
constexpr int64_t kRunElements = 16384;

// Rows of the run starting at row r (< end) of a view of rows of n entries.
template <typename T>
int64_t run_rows(const RowView<T>& v, int64_t r, int64_t end, int64_t n) {
  if (v.spatial == 1 || v.stride_c == 1) return 1;
  const int64_t most = std::clamp<int64_t>(kRunElements / std::max<int64_t>(n, 1), 1, kRunRows);
  return std::min({most, end - r, v.spatial - r % v.spatial});
}

// buf[k * n + c] = scale * row (r + k)[c] for the w rows of a run, in acc_t.
template <typename scalar_t, typename acc_t>
KDFAST_INLINE void load_run(const RowView<const scalar_t>& v, int64_t r, int64_t w, int64_t n,
                            acc_t scale, acc_t* buf) {
  if (w == 1) return load_row(v.row(r), n, v.stride_c, scale, buf);
  const scalar_t* x = v.row(r);
  for (int64_t c = 0; c < n; ++c) {
    const scalar_t* xc = x + c * v.stride_c;
    for (int64_t k = 0; k < w; ++k) buf[k * n + c] = static_cast<acc_t>(xc[k * v.stride_s]) * scale;
  }
}

// row (r + k)[c] = scale * buf[k * n + c] rounded to scalar_t, for the w rows of a run.
template <typename scalar_t, typename acc_t>
KDFAST_INLINE void store_run(const acc_t* buf, int64_t r, int64_t w, int64_t n, acc_t scale,
                             const RowView<scalar_t>& v) {
  if (w == 1) return store_row(buf, n, scale, v.row(r), v.stride_c);
  scalar_t* out = v.row(r);
  for (int64_t c = 0; c < n; ++c) {
    scalar_t* oc = out + c * v.stride_c;
    for (int64_t k = 0; k < w; ++k) {
      oc[k * v.stride_s] = static_cast<scalar_t>(buf[k * n + c] * scale);
    }
  }
}

template <typename acc_t>
KDFAST_INLINE acc_t row_max(const acc_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

// Row reductions run over blocks of kBlock columns: acc_t lane partials inside a block (a
// float64 accumulator in an `omp simd` loop over float32 data stops the vectorisation of
// the exp), folded into float64 per block. A float32 block sum of terms of one sign has a
// relative error of about 1e-7.
constexpr int64_t kBlock = 1024;

// A shifted softmax denominator: exp(x - max) sums to `sum`; lse = max + log(sum). The
// sum and the lse are float64 (also for float32 rows): KL subtracts two lses, and their
// float32 rounding alone is about 1e-5 of a KL of 0.06 at C = 700.
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
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    acc_t part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t c = b; c < e; ++c) {
      out[c] = exp_approx<true>(x[c] - m);
      part += out[c];
    }
    sum += static_cast<double>(part);
  }
  return {m, sum};
}

// Gradient outputs: large ones are recycled buffers (csrc/cpu/output_pool.h).
using ::kdfast::pool::empty_output;

// 2-D logits: contiguous columns (stride 1) or a copy; the row stride is kept (expanded rows
// allowed). (N, C, S) logits are read with their strides as they are.
inline at::Tensor unit_column_stride(const at::Tensor& x) {
  return x.dim() != 2 || x.stride(1) == 1 ? x : x.contiguous();
}

// Validates (B, C) / (N, C, S) logits of one shape for the op `name`.
inline void check_logit_shapes(const char* name, const at::Tensor& s, const at::Tensor& t) {
  TORCH_CHECK((s.dim() == 2 || s.dim() == 3) && s.sizes() == t.sizes(), name,
              ": expected equal (rows, C) or (N, C, S) shapes, got ", s.sizes(), " and ",
              t.sizes());
}

// Elements per parallel task: small enough that (256, 1000) splits in 4 and runs on two
// threads (as torch.compile's code does), large enough that a task outweighs waking a
// thread, which costs an idle machine a few microseconds (a busy one can make it cost a
// whole scheduler tick).
constexpr int64_t kTaskElements = 65536;

// Rows per parallel task (at least kTaskElements elements).
inline int64_t row_grain(int64_t columns) {
  return std::max<int64_t>(1, kTaskElements / std::max<int64_t>(columns, 1));
}

}  // namespace kdfast::rows
