"""Compile configurations of kdfast's Triton kernels: ``tools/gpu/specs/<op>.py`` holds
``AOT_SPECS``, a list of ``tools.gpu.aot.KernelSpec``, for every ``@triton.jit`` kernel of
``kdfast/triton/<op>.py`` with every configuration its launcher can use (dtypes, block
sizes, warps, autotune candidates); helpers called by a kernel are compiled inside it.
Importing a spec module imports its kernel module (needs Triton)."""
