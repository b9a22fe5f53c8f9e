"""Compiled RKD distance ops: ``kdfast::rkd_distance_cpp`` (CPU) and
``kdfast::rkd_distance_cuda`` (CUDA), their fake kernels and autograd.

The C++ op computes the loss from the float64 Gram matrix of the centred features
(SPEC 1.5); its backward op recomputes the Gram matrices (two GEMMs) instead of saving
N x N intermediates.
"""

from __future__ import annotations

import torch

from kdfast import _dispatch, _extension
from kdfast.ops._common import forbid_double_backward, grad_or_empty, scalar_like

#: backend -> device the compiled op is registered for
BACKEND_DEVICES = {"cpp": "cpu", "cuda": "cuda"}


def _register(backend: str, device: str) -> None:
    name = f"kdfast::rkd_distance_{backend}"
    forward = getattr(torch.ops.kdfast, f"rkd_distance_{backend}").default
    backward_op = getattr(torch.ops.kdfast, f"rkd_distance_{backend}_backward").default

    torch.library.register_fake(name)(lambda student, teacher: scalar_like(student, teacher))

    @torch.library.register_fake(f"{name}_backward")
    def _(grad, student, teacher, student_grad, teacher_grad):
        return grad_or_empty(student, student_grad), grad_or_empty(teacher, teacher_grad)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        student, teacher = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad
        grad_s, grad_t = backward_op(grad, student, teacher, need_s, need_t)
        return (grad_s if need_s else None, grad_t if need_t else None)

    torch.library.register_autograd(name, backward, setup_context=setup_context)
    forbid_double_backward(f"{name}_backward")
    _dispatch.implement("rkd_distance", backend, forward, devices={device})


if _extension.unavailable_reason() is None:
    _register("cpp", "cpu")
    if _extension.cuda_unavailable_reason() is None:
        _register("cuda", "cuda")
if _dispatch.BACKENDS["triton"].unavailable is None:
    import kdfast.triton.rkd_distance  # noqa: F401  (registers kdfast::rkd_distance_triton)
