// Tiled GEMMs for the ATen glue of the CPU ops (csrc/cpu/tiles.h): row blocks or groups of
// matrices set by the shapes alone, shared by the calling thread and the helpers, each block
// on one MKL thread, so the products do not depend on the thread count or timing.
#pragma once

#include "tiles.h"

namespace kdfast::tiles {

// Rows per tile of a tiled GEMM (mm): each tile streams (packs) all of b, so fewer rows than
// this make skinny GEMMs that cost more than they share. Measured on one MKL thread against
// one full GEMM, float64: (1024 x 2048) (2048 x 1024) in 64 / 128 / 256-row tiles +36% /
// +17% / +3%; (256 x 2048) (2048 x 256) in 64 / 128-row tiles +18% / +3%.
inline int64_t gemm_rows_per_tile(int64_t b_elements) {
  return b_elements >= (int64_t(1) << 21) ? 256 : b_elements >= (int64_t(1) << 18) ? 128 : 64;
}

// a @ b for 2-D CPU tensors a (m x k) and b (k x n): row blocks of a claimed as tiles, each an
// at::mm_out on one MKL thread (TileScope), so the GEMM shares its work with the helpers
// without opening MKL's own parallel region. The row blocks depend only on the shapes, so
// the result does not depend on the thread count or timing.
inline at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  const int64_t m = a.size(0), n = b.size(1);
  at::Tensor out = at::empty({m, n}, a.options());
  for_each_range(0, m, gemm_rows_per_tile(a.size(1) * n), [&](int64_t begin, int64_t end) {
    at::Tensor rows = out.narrow(0, begin, end - begin);
    at::mm_out(rows, a.narrow(0, begin, end - begin), b);
  });
  return out;
}

namespace detail {
// Multiply-adds below which a row block of one matrix is not worth its own tile: each block
// packs all of b again. Measured, expm of one 256 x 256 float32 matrix forward+backward: 5.8
// ms with whole GEMMs on one thread, 7.6 ms in 64-row blocks shared with a helper.
constexpr int64_t kMinRowBlockMacs = int64_t(1) << 24;

// out (+)= a @ b for batches (B x m x k)(B x k x n) in tiles that depend only on the shapes:
// row blocks of one matrix (mm's sizes, at least kMinRowBlockMacs each) when a matrix is more
// than one block, else groups of whole matrices of about 2^18 multiply-adds.
inline void bmm_tiles(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                      bool accumulate) {
  const int64_t batch = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  const int64_t row_macs = std::max<int64_t>(1, k * n);
  const int64_t rows = std::max(gemm_rows_per_tile(k * n),
                                (kMinRowBlockMacs + row_macs - 1) / row_macs);
  const int64_t blocks = tile_count(m, rows);
  if (blocks > 1) {
    for_each_tile(batch * blocks, [&](int64_t tile) {
      const int64_t i = tile / blocks, r0 = (tile % blocks) * rows;
      const int64_t r = std::min(rows, m - r0);
      at::Tensor o = out.select(0, i).narrow(0, r0, r);
      const at::Tensor ai = a.select(0, i).narrow(0, r0, r);
      accumulate ? o.addmm_(ai, b.select(0, i)) : at::mm_out(o, ai, b.select(0, i));
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, m * k * n));
  for_each_range(0, batch, grain, [&](int64_t begin, int64_t end) {
    at::Tensor o = out.narrow(0, begin, end - begin);
    const at::Tensor ai = a.narrow(0, begin, end - begin), bi = b.narrow(0, begin, end - begin);
    accumulate ? o.baddbmm_(ai, bi) : at::bmm_out(o, ai, bi);
  });
}

// Whether a batched GEMM on `a` goes to tiles: on CPU, inside an OpScope, not already in a
// tile or a parallel region.
inline bool tiled_bmm(const at::Tensor& a) {
  return a.is_cpu() && op_depth > 0 && !run_inline();
}
}  // namespace detail

// at::bmm(a, b) for the ATen glue of a CPU op: inside an OpScope, on CPU, in shape-only tiles
// shared with the helpers (each on one MKL thread); elsewhere at::bmm itself.
inline at::Tensor bmm(const at::Tensor& a, const at::Tensor& b) {
  if (!detail::tiled_bmm(a)) return at::bmm(a, b);
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  detail::bmm_tiles(out, a, b, /*accumulate=*/false);
  return out;
}

// c.baddbmm_(a, b) (c += a @ b), tiled like bmm.
inline at::Tensor& baddbmm_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  if (!detail::tiled_bmm(a)) return c.baddbmm_(a, b);
  detail::bmm_tiles(c, a, b, /*accumulate=*/true);
  return c;
}

}  // namespace kdfast::tiles
