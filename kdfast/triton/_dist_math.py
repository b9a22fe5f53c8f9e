"""Per-element math of the Triton fused DIST (kdfast/triton/dist_loss.py), as in
csrc/dist_loss.h: the activation, Pearson coefficients from centred sums, the
Chan-Golub-LeVeque merge of moments and dL/dy of a tile. Device helpers only (compiled
inside the kernels of kdfast.triton.dist_loss and its AOT specs)."""

from __future__ import annotations

import triton
import triton.language as tl

#: csrc/dist_loss.h: eps added to the product of the norms
COSINE_EPS = tl.constexpr(1e-8)


@triton.jit
def activate(z, inv_temperature, mx, inv_sum, SIGMOID: tl.constexpr):
    """y = sigmoid(z / T), or softmax from the row's max and 1 / sum (bit-identical in
    every kernel: the column centring of B = 1 must give exactly 0)."""
    u = z * inv_temperature
    if SIGMOID:
        y = 1.0 / (1.0 + tl.exp(-u))
    else:
        y = tl.exp(u - mx[:, None]) * inv_sum[:, None]
    return y


@triton.jit
def pearson(saa, sbb, sab):
    """(rho, 1 / D, k_a, k_b) from centred sums (csrc/dist_loss.h)."""
    na = tl.sqrt(saa)
    nb = tl.sqrt(sbb)
    inv_d = 1.0 / (na * nb + COSINE_EPS)
    k_a = tl.where(na > 0.0, sab * nb / tl.where(na > 0.0, na, 1.0) * inv_d * inv_d, 0.0)
    k_b = tl.where(nb > 0.0, sab * na / tl.where(nb > 0.0, nb, 1.0) * inv_d * inv_d, 0.0)
    return sab * inv_d, inv_d, k_a, k_b


@triton.jit
def merge_moments(na, nb, mean_x, mean_y, m2x, m2y, cxy, b_mean_x, b_mean_y, b_m2x, b_m2y, b_cxy):
    """Chan-Golub-LeVeque update of (na, moments) with a block of nb rows (nb may be 0)."""
    n = na + nb
    n_safe = tl.where(n > 0.0, n, 1.0)
    ratio = nb / n_safe
    w = na * ratio
    dx = b_mean_x - mean_x
    dy = b_mean_y - mean_y
    return (
        mean_x + dx * ratio,
        mean_y + dy * ratio,
        m2x + b_m2x + dx * dx * w,
        m2y + b_m2y + dy * dy * w,
        cxy + b_cxy + dx * dy * w,
    )


@triton.jit
def dloss_dy(ys, yt, cols, ok, row, coef_ptr, n64, w_row, w_col, STUDENT: tl.constexpr):
    """g = dL/dy of the student (STUDENT) or teacher side, for a tile (csrc/dist_loss.h)."""
    col_ok = cols < n64
    m_s = tl.load(coef_ptr + cols, mask=col_ok, other=0.0)[None, :]
    m_t = tl.load(coef_ptr + n64 + cols, mask=col_ok, other=0.0)[None, :]
    inv_d = tl.load(coef_ptr + 2 * n64 + cols, mask=col_ok, other=0.0)[None, :]
    mean_s = tl.load(row + 4)[:, None]
    mean_t = tl.load(row + 5)[:, None]
    row_inv_d = tl.load(row + 6)[:, None]
    if STUDENT:
        k_col = tl.load(coef_ptr + 3 * n64 + cols, mask=col_ok, other=0.0)[None, :]
        k_row = tl.load(row + 7)[:, None]
        row_part = (yt - mean_t) * row_inv_d - k_row * (ys - mean_s)
        col_part = (yt - m_t) * inv_d - k_col * (ys - m_s)
    else:
        k_col = tl.load(coef_ptr + 4 * n64 + cols, mask=col_ok, other=0.0)[None, :]
        k_row = tl.load(row + 8)[:, None]
        row_part = (ys - mean_s) * row_inv_d - k_row * (yt - mean_t)
        col_part = (ys - m_s) * inv_d - k_col * (yt - m_t)
    return tl.where(ok, w_row * row_part + w_col * col_part, 0.0)
