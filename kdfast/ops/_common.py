"""Helpers for registering compiled kdfast ops with torch.library."""

from __future__ import annotations

import torch

from kdfast import _dispatch
from kdfast._validation import compute_dtype, rows_2d


def define_op(name: str, fn) -> torch._ops.OpOverload:
    """Register the type-annotated launcher ``fn`` as the custom op ``name``
    ("kdfast::<op>_<backend>"), schema inferred from its annotations; returns the op."""
    torch.library.custom_op(name, mutates_args=())(fn)
    namespace, op_name = name.split("::")
    return getattr(getattr(torch.ops, namespace), op_name).default


def scalar_like(*tensors: torch.Tensor) -> torch.Tensor:
    """A fake scalar loss in promote_types(*dtypes, float32) on the first tensor's device."""
    return tensors[0].new_empty((), dtype=compute_dtype(*tensors))


def grad_or_empty(x: torch.Tensor, needed: bool) -> torch.Tensor:
    """Fake gradient of ``x``: contiguous like ``x`` when needed, else an empty (0,) tensor."""
    return x.new_empty(x.shape) if needed else x.new_empty((0,))


def forbid_double_backward(op_name: str) -> None:
    """Make differentiating through ``op_name`` (a backward op) raise a clear error."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op_name} is a once-differentiable backward: double backward through kdfast's "
            "compiled kernels is not supported; use kdfast.use_backend('reference') for "
            "higher-order gradients"
        )

    torch.library.register_autograd(
        op_name, backward, setup_context=lambda ctx, inputs, output: None
    )


#: How a compiled logit op takes (N, C, S) logits (a backend capability, semantics 0):
#: "strided" reads any strides in place; "contiguous" reads contiguous ones in place (others
#: are made contiguous first, same layout); "rows" gets a permuted (rows, C) copy.
LOGIT_LAYOUTS = ("strided", "contiguous", "rows")


def logits_for(layout: str, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) (B, C) / (N, C, S) logits as an op of ``layout`` takes them."""
    if s.dim() == 2 or layout == "strided":
        return s, t
    if layout == "contiguous":
        return s.contiguous(), t.contiguous()
    return rows_2d(s), rows_2d(t)


def grad_flags(student: torch.Tensor, teacher: torch.Tensor) -> tuple[bool, bool]:
    """(compute_grad_student, compute_grad_teacher) for ops that write the gradient in the
    forward pass: only when grad mode is on and that input requires grad."""
    enabled = torch.is_grad_enabled()
    return enabled and student.requires_grad, enabled and teacher.requires_grad


@torch.library.custom_op("kdfast::scale_saved_grad", mutates_args=())
def scale_saved_grad(grad: torch.Tensor, saved: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``saved * grad``: the backward of an op that computed its gradient in the forward.

    Args:
        grad: () for a scalar loss, or (rows,) for a per-row loss (row i scales row i).
        saved: (rows, C) or (N, C, S) (rows r = n * S + s) gradient of the loss (of each
            row's loss) with grad = 1.
        input: the differentiated input, shaped as ``saved``; unused except as the autograd
            link, so that differentiating this backward raises (once-differentiable).
    """
    scale = grad
    if grad.dim() == 1:
        scale = grad.reshape(-1, 1) if saved.dim() == 2 else grad.reshape(len(saved), 1, -1)
    return (saved * scale).to(input.dtype)


@scale_saved_grad.register_fake
def _(grad: torch.Tensor, saved: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    return saved.new_empty(saved.shape, dtype=input.dtype)


forbid_double_backward("kdfast::scale_saved_grad")


def saved_grad_backward(ctx, grad: torch.Tensor, saved_names=("student", "teacher")):
    """Backward of a (loss, grad_student, grad_teacher) op: scale the saved gradients.

    ``ctx`` holds (grad_student, grad_teacher, student, teacher) from setup_context; returns
    the gradients of the first two inputs (None for inputs that need none).
    """
    grad_s, grad_t, student, teacher = ctx.saved_tensors
    if grad is None:  # gradients are not materialised (setup_saved_grad): the loss got none
        return None, None
    out = []
    for i, (saved, x) in enumerate(((grad_s, student), (grad_t, teacher))):
        if not ctx.needs_input_grad[i]:
            out.append(None)
            continue
        if saved.numel() == 0 and x.numel() != 0:
            raise RuntimeError(
                f"the {saved_names[i]} gradient was not computed in the forward pass (it was "
                f"called under no_grad or with compute_grad_{saved_names[i]}=False)"
            )
        if is_plain_unit_grad(grad, saved, x):
            out.append(saved)  # the usual loss.backward(): no (rows, C) multiply and copy
        else:
            out.append(scale_saved_grad(grad, saved, x))
    return tuple(out)


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True): then the saved
    tensors outlive this call. Assumed when torch cannot tell (an API torch's own AOT
    autograd uses; outside a backward it answers True)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


def is_plain_unit_grad(grad: torch.Tensor, saved: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the saved gradient can be returned as it is: an upstream gradient of exactly 1
    on the CPU, in eager mode without create_graph (grad mode is off in such a backward, so
    no double backward can go through the returned tensor; otherwise scale_saved_grad keeps
    raising on it), on real tensors (not traced), and only when this is the saved tensor's
    last use: with retain_graph=True a later backward would return the same storage again
    (and see in-place changes made to this result), so each call gets its own product."""
    return (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and type(grad) is torch.Tensor  # not a fake / functional tensor of a tracer
        and type(saved) is torch.Tensor
        and not _graph_is_kept()
        and grad.device.type == "cpu"
        and grad.numel() == 1
        and saved.dtype == x.dtype
        and grad.item() == 1.0
    )


def setup_saved_grad(ctx, inputs, output) -> None:
    """setup_context of a (loss, grad_student, grad_teacher) op whose first two inputs are
    (student, teacher)."""
    _, grad_s, grad_t = output
    ctx.mark_non_differentiable(grad_s, grad_t)
    # the backward ignores the (rows, C) gradient outputs' own gradients: without this,
    # autograd materialises them as zeros (a (rows, C) fill per backward)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_s, grad_t, inputs[0], inputs[1])


def register_relational_loss(
    op: str, name: str, backward_op, backend: str, devices=None, check_args=None
) -> None:
    """Fake kernels, autograd and dispatcher entry of a relational loss op.

    ``name`` is a custom op ``(student, teacher, *extra) -> loss`` (a scalar in
    promote_types(student, teacher, float32); ``extra`` are non-tensor arguments, e.g. the
    vertex range of ``rkd_angle_vertices``); ``backward_op`` is its companion
    ``name_backward(grad, student, teacher, *extra, student_grad, teacher_grad) -> (grad_s,
    grad_t)``, which returns an empty (0,) tensor for a side that needs no gradient and
    recomputes what it needs from the inputs (nothing of the forward is saved but them).
    ``check_args(student, teacher, *extra)`` validates the arguments in the fake kernels
    (the real kernels check them themselves).
    """

    @torch.library.register_fake(name)
    def _(student, teacher, *extra):
        if check_args is not None:
            check_args(student, teacher, *extra)
        return scalar_like(student, teacher)

    @torch.library.register_fake(f"{name}_backward")
    def _(grad, student, teacher, *rest):
        *extra, student_grad, teacher_grad = rest
        if check_args is not None:
            check_args(student, teacher, *extra)
        return grad_or_empty(student, student_grad), grad_or_empty(teacher, teacher_grad)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])
        ctx.extra = tuple(inputs[2:])

    def backward(ctx, grad):
        student, teacher = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[:2]
        grad_s, grad_t = backward_op(grad, student, teacher, *ctx.extra, need_s, need_t)
        return (grad_s if need_s else None, grad_t if need_t else None) + (None,) * len(ctx.extra)

    torch.library.register_autograd(name, backward, setup_context=setup_context)
    forbid_double_backward(f"{name}_backward")
    namespace, op_name = name.split("::")
    forward = getattr(getattr(torch.ops, namespace), op_name).default
    _dispatch.implement(op, backend, forward, devices=devices)
