"""64-bit indexing: bf16 DIST with B * C ~ 2.2e9 > 2^31 elements, on CPU.

Marked slow and deselected by default (pyproject addopts ``-m "not slow"``); run with
``pytest -m slow tests/test_large.py``. The batch tiles a small float64-exact base k times,
so the truth comes from the base: the per-row and per-column Pearson correlations of a
tiled batch are those of the base, hence DIST(tiled) = DIST(base), and each gradient row is
the base row's gradient / k. Rows on both sides of the 2^31-element boundary are checked.
A backend whose estimated peak memory exceeds the available memory is skipped, with the
reason (the reference materialises several float32 (B, C) temporaries: ~45 GB here).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import backends_for

import kdfast
from kdfast.testing import rel_error

C = 1024
BASE_ROWS = 8
TILES = 268_557  # B = 2_148_456 rows, B * C = 2.2e9 elements
#: rough peak bytes per (B, C) element: the reference keeps ~10 float32 temporaries
BYTES_PER_ELEMENT = {"reference": 48}
DEFAULT_BYTES_PER_ELEMENT = 8  # bf16 inputs + bf16 gradient + slack, for streaming kernels


def _available_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends_for("dist_loss"))
def test_dist_bf16_beyond_int32_elements(backend):
    rows = BASE_ROWS * TILES
    assert rows * C > 2**31
    need = rows * C * BYTES_PER_ELEMENT.get(backend, DEFAULT_BYTES_PER_ELEMENT)
    if need > _available_bytes():
        pytest.skip(
            f"{backend}: needs ~{need / 2**30:.0f} GiB, {_available_bytes() / 2**30:.0f} available"
        )
    g = torch.Generator().manual_seed(0)
    base_s = (2 * torch.randn(BASE_ROWS, C, generator=g)).bfloat16()
    base_t = (2 * torch.randn(BASE_ROWS, C, generator=g)).bfloat16()
    s_small = base_s.double().requires_grad_(True)
    truth = kdfast.functional.dist_loss(s_small, base_t.double(), temperature=2.0)
    (truth_grad,) = torch.autograd.grad(truth, s_small)

    zs = base_s.repeat(TILES, 1).requires_grad_(True)
    zt = base_t.repeat(TILES, 1)
    with kdfast.use_backend(backend):
        loss = kdfast.functional.dist_loss(zs, zt, temperature=2.0)
    assert loss.dtype == torch.float32
    assert rel_error(loss, truth) <= 1e-4, rel_error(loss, truth)
    (grad,) = torch.autograd.grad(loss, zs)
    boundary = 2**31 // C
    for row in (0, boundary - 1, boundary, boundary + 1, rows - 1):
        want = truth_grad[row % BASE_ROWS] / TILES
        assert rel_error(grad[row], want) <= 1e-2, (row, rel_error(grad[row], want))
