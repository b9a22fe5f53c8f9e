"""Input validation shared by every public function and module constructor.

Errors name the argument and the shapes seen. Public functions (kdfast.functional,
kdfast.linalg, ...) validate once, with these helpers and the option checks built on them
(nn.Module constructors call the same checks to fail early), then hand (rows, features),
(B, C) or (N, C, S) tensors to whichever backend the dispatcher picks; backends assume
validated input. What stays in a backend guards memory for direct callers of
``torch.ops.kdfast.*``: the C++ TORCH_CHECKs, the Triton launchers' shape and layout checks,
and the vertex range of ``rkd_angle_vertices`` (checked by every backend).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x: object) -> Tensor:
    """Raise TypeError unless ``x`` is a floating-point tensor of a supported dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype} "
            f"(shape {tuple(x.shape)})"
        )
    return x


def compute_dtype(*tensors: Tensor | torch.dtype) -> torch.dtype:
    """promote_types(*dtypes, float32): the dtype a loss computes and returns in (semantics 0).

    The one place this rule is written; takes tensors or dtypes."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t if isinstance(t, torch.dtype) else t.dtype)
    return dtype


def check_same_device(**named: Tensor | None) -> torch.device:
    """Raise ValueError unless every given tensor lives on one device; return it."""
    items = [(k, v) for k, v in named.items() if v is not None]
    device = items[0][1].device
    for _, v in items[1:]:
        if v.device != device:
            seen = ", ".join(f"{n} on {t.device}" for n, t in items)
            raise ValueError(f"all tensors must be on one device, got {seen}")
    return device


def check_rank(name: str, x: Tensor, min_rank: int) -> None:
    if x.dim() < min_rank:
        raise ValueError(f"{name} must have at least {min_rank} dims, got shape {tuple(x.shape)}")


def as_logits(name: str, x: Tensor) -> Tensor:
    """Logits (B, C) as they are, (N, C, *) as (N, C, S) with S = prod(*) (semantics 0).

    The class dimension stays at 1 and rows are r = n * S + s: a view whenever the trailing
    dims can be flattened, never a permuted copy (the compiled kernels read the strides).
    """
    check_rank(name, x, 2)
    if x.dim() == 2:
        return x
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))  # no -1: sizes may be 0


def logit_rows(x: Tensor) -> int:
    """Number of rows of (B, C) or (N, C, S) logits: B or N * S."""
    return x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[2]


def kept_rows_2d(x: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`rows_2d` with the rows ``mask`` drops set to 0, so a NaN or Inf in a padding
    row reaches neither the loss nor any gradient (their gradient is exactly 0)."""
    x = rows_2d(x)
    return x if mask is None else torch.where(mask[:, None], x, 0.0)


def rows_2d(x: Tensor) -> Tensor:
    """(rows, C) form of (B, C) or (N, C, S) logits, row r = n * S + s (a permuted copy for
    S > 1; for the references and the cross-rank gather, not for the kernels)."""
    return x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])


def check_logit_pair(
    student: Tensor,
    teacher: Tensor,
    names=("student_logits", "teacher_logits"),
    allow_no_rows: bool = False,
):
    """Validate a (student, teacher) logit pair and return both as (B, C) or (N, C, S)
    (:func:`as_logits`).

    ``allow_no_rows``: accept 0 rows (a rank's empty share of a gathered batch).
    """
    sn, tn = names
    check_tensor(sn, student)
    check_tensor(tn, teacher)
    check_same_device(**{sn: student, tn: teacher})
    check_rank(sn, student, 2)
    check_rank(tn, teacher, 2)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{sn} and {tn} must have the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    s, t = as_logits(sn, student), as_logits(tn, teacher)
    if (logit_rows(s) == 0 and not allow_no_rows) or s.shape[1] == 0:
        raise ValueError(f"{sn} must be non-empty, got shape {tuple(student.shape)}")
    return s, t


def check_mask(mask: Tensor | None, rows: int, device: torch.device) -> Tensor | None:
    """Validate an optional boolean row mask of shape (rows,)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the logits are on {device}")
    if mask.dim() == 0 or mask.numel() != rows:
        raise ValueError(
            f"mask must have {rows} entries (one per row), got shape {tuple(mask.shape)}"
        )
    return mask.reshape(rows)


def check_feature_pair(student: Tensor, teacher: Tensor, min_rows: int, what: str):
    """Validate relational features and flatten each to (N, -1); N must be >= min_rows."""
    check_tensor("student", student)
    check_tensor("teacher", teacher)
    check_same_device(student=student, teacher=teacher)
    check_rank("student", student, 2)
    check_rank("teacher", teacher, 2)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must have the same batch size, got shapes "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[0] < min_rows:
        raise ValueError(
            f"{what} needs at least {min_rows} samples, got student shape {tuple(student.shape)}"
        )
    s, t = student.flatten(1), teacher.flatten(1)
    for name, x, orig in (("student", s, student), ("teacher", t, teacher)):
        if x.shape[1] == 0:
            raise ValueError(f"{name} has no features, got shape {tuple(orig.shape)}")
    return s, t


def check_choice(name: str, value: object, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"{name} must be one of {', '.join(sorted(map(repr, choices)))}, got {value!r}"
        )


def is_real(value: object) -> bool:
    """Whether ``value`` is a real Python number: an int or a float, bool excluded (the one
    spelling of "real number" in kdfast)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_real(name: str, value: object) -> float:
    """A finite-or-not real Python number (bool excluded), as float; TypeError otherwise."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_weight(name: str, value: object) -> float:
    """A loss term's weight: a finite real number >= 0, as float; ValueError otherwise."""
    value = check_real(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value


def check_positive(name: str, value: object, finite: bool = False) -> float:
    """A real number > 0 (and finite when ``finite``), as float; ValueError otherwise."""
    if not is_real(value) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: object) -> float:
    """A real number in [0, 1], as float (TypeError when not a real number)."""
    if not 0.0 <= check_real(name, value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    """TypeError unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_vertex_range(start: object, stop: object, n: int) -> None:
    """The vertex range ``[start, stop)`` of ``rkd_angle_vertices``: Python ints (bool
    excluded; TypeError) with 0 <= start <= stop <= n (ValueError). The compiled kernels
    raise the same ValueError."""
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise TypeError(
                f"rkd_angle_vertices: {name} must be an int, got {type(value).__name__}"
            )
    if not (0 <= start <= stop <= n):
        raise ValueError(
            "rkd_angle_vertices: the vertex range [start, stop) must satisfy 0 <= start <= "
            f"stop <= N = {n}, got start = {start}, stop = {stop}"
        )
