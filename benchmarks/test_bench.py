"""The benchmark suite's cases under pytest-benchmark: ``pytest benchmarks/``.

Not part of the test run (``testpaths`` is ``tests``). Each case's forward+backward is
timed for kdfast's automatic backend and the eager reference at the suite's quick sizes
(``--benchmark-only``; add ``-k smoke`` for the tiny sizes). Peak memory and the
fresh-process protocol live in ``python -m kdfast.bench``.
"""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast.bench.cases import CASES

PARAMS = [
    pytest.param(
        case, tuple(size), impl, id=f"{case.name}-{suite}-{'x'.join(map(str, size))}-{impl}"
    )
    for case in CASES
    for suite in ("smoke", "quick")
    for size in case.sizes[suite]
    for impl in ("kdfast", "reference")
]


@pytest.mark.parametrize("case,size,impl", PARAMS)
def test_forward_backward(benchmark, case, size, impl):
    backend = None if impl == "kdfast" else "reference"
    with kdfast.use_backend(backend):
        forward, params = case.setup(size, "cpu", torch.float32)

    def step():
        for p in params:
            p.grad = None
        with kdfast.use_backend(backend):
            forward().sum().backward()

    benchmark(step)
    assert params[0].grad is not None and torch.isfinite(params[0].grad).all()
