"""GPU readiness without a GPU: ahead-of-time compilation of kdfast's kernels and checks of
what ptxas / nvcc produce.

* ``aot``: ``KernelSpec`` and the Triton compile (``triton.compile`` for sm_80 / sm_90),
  kernel discovery and the coverage checks (every ``@triton.jit`` kernel has a spec);
* ``specs/<op>.py``: the compile configurations (``AOT_SPECS``) of ``kdfast/triton/<op>.py``;
* ``ptx``: ptxas logs, PTX (64-bit offsets) and SASS (tensor-core instructions) checks;
* ``cuda``: csrc/cuda/*.cu compiled with ``nvcc -Xptxas -v``;
* ``occupancy``: theoretical occupancy from a table of per-SM limits;
* ``report``: ``python -m tools.gpu.report``, kernel resources and the roofline floor.

Nothing in the ``kdfast`` package imports this one.
"""
