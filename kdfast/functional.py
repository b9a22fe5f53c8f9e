"""Functional KD losses (``torch.nn.functional`` style).

Each function validates its inputs once (errors name the argument and the shapes), views
logits as (rows, C), then hands them to the backend chosen by :mod:`kdfast._dispatch`.
Argument order is ``(student, teacher)`` everywhere. Losses compute in
``promote_types(student, teacher, float32)`` and return that dtype. A teacher that
``requires_grad`` is differentiated exactly as written (online / mutual distillation).
See docs/semantics.md for the exact definitions.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from kdfast import _dispatch
from kdfast import distributed as _distributed
from kdfast import fused_linear as _fused_linear
from kdfast._constants import (
    DIST_ACTIVATIONS,
    KD_REDUCTIONS,
    KD_TEACHER_KINDS,
    VKD_NORMALIZATIONS,
)
from kdfast._deprecation import renamed_keywords
from kdfast._validation import (
    check_bool,
    check_choice,
    check_feature_pair,
    check_logit_pair,
    check_mask,
    check_positive,
    check_real,
    check_same_device,
    check_tensor,
    check_unit_interval,
    check_weight,
    logit_rows,
    rows_2d,
)


def _autocast_off(device: torch.device):
    """A context disabling autocast on ``device`` when it is on (else a no-op).

    Under ``torch.autocast`` a loss still computes its statistics in
    promote_types(student, teacher, float32) (semantics 0): autocast would otherwise run the
    reference's matmuls (Gram matrices, angle cosines) in float16 / bfloat16, where RKD on
    unnormalised features overflows and the angle loss loses 4 digits. Half inputs (e.g. the
    outputs of autocast layers) are accepted as they are; the loss is float32.
    """
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _call(op: str, *args):
    """``_dispatch.call`` with autocast disabled on the inputs' device."""
    with _autocast_off(args[0].device):
        return _dispatch.call(op, *args)


def check_kd_options(temperature, reduction: str, teacher_kind: str = "logits") -> float:
    """Validate kd_loss's options (also KDLoss's constructor); return T as float."""
    temperature = check_positive("temperature", temperature, finite=True)
    check_choice("reduction", reduction, KD_REDUCTIONS)
    check_choice("teacher_kind", teacher_kind, KD_TEACHER_KINDS)
    return temperature


def check_jsd_options(beta, temperature, reduction: str) -> tuple[float, float]:
    """Validate jsd_loss's options (also JSDLoss's constructor); return (beta, T) as floats."""
    temperature = check_positive("temperature", temperature, finite=True)
    beta = check_unit_interval("beta", beta)
    check_choice("reduction", reduction, KD_REDUCTIONS)
    return beta, temperature


def check_dist_options(beta, gamma, temperature, temperature_squared, activation: str):
    """Validate dist_loss's options (also DISTLoss's constructor); return (beta, gamma, T)
    as floats."""
    temperature = check_positive("temperature", temperature, finite=True)
    beta, gamma = check_real("beta", beta), check_real("gamma", gamma)
    check_choice("activation", activation, DIST_ACTIVATIONS)
    check_bool("temperature_squared", temperature_squared)
    return beta, gamma, temperature


def _is_str(value: object) -> bool:
    return isinstance(value, str)


@renamed_keywords(teacher=("teacher_kind", _is_str))
def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
    teacher_kind: str = "logits",
) -> Tensor:
    """Hinton KD: ``T^2 * KL(p_t || p_s)`` with ``p = softmax(z / T)`` over the class dim.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015 (semantics 3).

    Args:
        student_logits: (B, C) or (N, C, *) logits (class dim 1).
        teacher_logits: same shape; logits, or cached probabilities / log-probabilities at
            temperature T when ``teacher_kind`` is "probs" / "log_probs".
        temperature: T > 0.
        reduction: "batchmean" (sum / rows, default), "sum", "mean" (sum / (rows * C), as
            ``F.kl_div``) or "none" (a (rows,) vector of T^2 * per-row KL).
        mask: optional bool (rows,) keeping rows (False = padding); means are over kept rows.
        teacher_kind: what ``teacher_logits`` holds: "logits", "probs" or "log_probs"
            (``teacher=``: deprecated alias).

    Returns:
        A scalar (or (rows,) for "none") in promote_types(student, teacher, float32).
    """
    s, t = check_logit_pair(student_logits, teacher_logits)
    temperature = check_kd_options(temperature, reduction, teacher_kind)
    mask = check_mask(mask, logit_rows(s), s.device)
    return _call("kd_loss", s, t, temperature, reduction, mask, teacher_kind)


def per_sample_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Per-row ``KL(p_t || p_s)`` at temperature T, without the T^2 factor (semantics 3).

    Feeds SSD-KD priorities. Inputs (B, C) or (N, C, *); returns (rows,).
    """
    s, t = check_logit_pair(student_logits, teacher_logits)
    temperature = check_positive("temperature", temperature, finite=True)
    return _call("per_sample_kl", s, t, temperature)


def jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al., ICLR 2024; TRL's
    ``GKDTrainer.generalized_jsd_loss``, Liger-Kernel's ``LigerJSD``).

    With ``p = softmax(z / T)`` over the class dim and ``m = beta p_t + (1 - beta) p_s``:
    ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` per row for 0 < beta < 1;
    ``KL(p_t || p_s)`` (forward) at beta = 0 and ``KL(p_s || p_t)`` (reverse) at beta = 1,
    as TRL. No T^2 factor (TRL). Details: :mod:`kdfast.reference.jsd_loss`.

    Args:
        student_logits: (B, C) or (N, C, *) logits, class dim 1: token logits (B, L, V)
            are passed as (B * L, V) (as given, L would be read as the class dim).
        teacher_logits: same shape.
        beta: in [0, 1], the teacher's weight in the mixture. Default 0.5 (symmetric JSD).
        temperature: T > 0, finite.
        reduction: "batchmean" (sum / rows, default), "sum", "mean" (sum / (rows * C)) or
            "none" (a (rows,) vector of per-row divergences).
        mask: optional bool (rows,) keeping rows (False = padding, e.g. TRL's
            ``labels != -100``); means are over kept rows.

    Returns:
        A scalar (or (rows,) for "none") in promote_types(student, teacher, float32).
    """
    s, t = check_logit_pair(student_logits, teacher_logits)
    beta, temperature = check_jsd_options(beta, temperature, reduction)
    mask = check_mask(mask, logit_rows(s), s.device)
    return _call("jsd_loss", s, t, beta, temperature, reduction, mask)


def reverse_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
) -> Tensor:
    """Reverse KL ``KL(p_s || p_t)`` per row, ``p = softmax(z / T)`` (the mode-seeking
    divergence of MiniLLM / GKD; TRL's and Liger-Kernel's JSD at beta = 1). No T^2 factor.

    The ``jsd_loss`` op at beta = 1 (the same kernels on every backend); the gradients are
    those of the reverse KL: ``p_s (log p_s - log p_t - KL) / T`` for the student.

    Args:
        student_logits: (B, C) or (N, C, *) logits, class dim 1 (token logits (B, L, V) as
            (B * L, V)).
        teacher_logits: same shape.
        temperature: T > 0, finite.
        reduction: "batchmean" (sum / rows, default), "sum", "mean" (sum / (rows * C)) or
            "none" ((rows,) per-row divergences).
        mask: optional bool (rows,) keeping rows; means are over kept rows.

    Returns:
        A scalar (or (rows,) for "none") in promote_types(student, teacher, float32).
    """
    return jsd_loss(student_logits, teacher_logits, 1.0, temperature, reduction, mask)


@renamed_keywords(tau="temperature", tau_squared="temperature_squared")
def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    temperature_squared: bool = True,
    activation: str = "softmax",
    mask: Tensor | None = None,
    *,
    gather: bool = False,
    process_group=None,
) -> Tensor:
    """DIST: ``beta * T^2 * inter + gamma * T^2 * intra`` (semantics 2).

    Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
    (hunto/DIST_KD). inter = 1 - mean Pearson correlation per sample (across classes),
    intra = 1 - mean Pearson correlation per class (across the batch), on softmax(z / T)
    (or element-wise sigmoid with ``activation="sigmoid"``, the detection variant).
    ``temperature_squared=False`` drops the T^2 factor. Inputs (B, C) or (N, C, *); ``mask``
    is a bool (rows,) keeping rows. Returns a scalar. ``tau=`` and ``tau_squared=`` are
    deprecated aliases of ``temperature=`` and ``temperature_squared=``.

    ``gather=True`` (torch.distributed initialised): the loss over the concatenated batch of
    every rank (both terms; the intra-class term from all-reduced per-column moments, no
    logits are exchanged). Local batches may differ in size (even be empty) but must share
    C; the global batch must be non-empty. Gradients follow the DDP convention of
    :mod:`kdfast.distributed`.
    """
    gathered = gather and _distributed.is_distributed(process_group)
    s, t = check_logit_pair(
        student_logits, teacher_logits, ("student_logits", "teacher_logits"), gathered
    )
    beta, gamma, temperature = check_dist_options(
        beta, gamma, temperature, temperature_squared, activation
    )
    mask = check_mask(mask, logit_rows(s), s.device)
    options = (beta, gamma, temperature, temperature_squared, activation, mask)
    if gathered:
        with _autocast_off(s.device):
            return _distributed.dist_loss_global(rows_2d(s), rows_2d(t), *options, process_group)
    return _call("dist_loss", s, t, *options)


def rkd_distance(
    student: Tensor, teacher: Tensor, *, gather: bool = False, process_group=None
) -> Tensor:
    """RKD distance loss (semantics 1.2): SmoothL1 between mean-normalised pairwise distances.

    Park et al., "Relational Knowledge Distillation", CVPR 2019 (lenscloth/RKD).
    student (N, Ds, *) and teacher (N, Dt, *) are flattened to (N, -1); N >= 2.

    ``gather=True`` (torch.distributed initialised): the loss over the concatenated batch of
    every rank of ``process_group`` (local batches may differ in size, even be empty; N >= 2
    applies to the global batch). Each rank's input gradient is world_size times the
    single-process gradient of its slice, so that DDP's averaging gives the gradient of the
    global loss (:mod:`kdfast.distributed`).
    """
    if gather and _distributed.is_distributed(process_group):
        s, t, _, _ = gather_features(student, teacher, 2, "rkd_distance", process_group)
    else:
        s, t = check_feature_pair(student, teacher, 2, "rkd_distance")
    return _call("rkd_distance", s, t)


def rkd_angle(
    student: Tensor, teacher: Tensor, *, gather: bool = False, process_group=None
) -> Tensor:
    """RKD angle loss (semantics 1.3): SmoothL1 between all N^3 triplet angle cosines.

    Park et al., CVPR 2019. student (N, Ds, *), teacher (N, Dt, *), flattened; N >= 3.

    ``gather=True``: over the global batch as in :func:`rkd_distance`; each rank evaluates
    only the angles whose vertex is one of its own rows (N^3 / world_size work), and the
    partial sums are all-reduced.
    """
    if gather and _distributed.is_distributed(process_group):
        s, t, start, stop = gather_features(student, teacher, 3, "rkd_angle", process_group)
        return rkd_angle_global(s, t, start, stop, process_group)
    s, t = check_feature_pair(student, teacher, 3, "rkd_angle")
    return _call("rkd_angle", s, t)


def rkd_loss(
    student: Tensor, teacher: Tensor, distance_weight: float = 1.0, angle_weight: float = 2.0
) -> Tensor:
    """RKD (semantics 1.4): ``distance_weight * rkd_distance + angle_weight * rkd_angle``,
    the function behind :class:`kdfast.losses.RKDLoss` (without ``gather``).

    student (N, Ds, *), teacher (N, Dt, *), flattened; N >= 3 (N >= 2 when angle_weight is
    0). Weights finite and >= 0, not both 0; a zero weight skips its term. The inputs are
    validated once. With both weights > 0, a backend that implements the ``rkd_loss`` op
    (cpp) forms each side's centred float64 Gram matrix once per step: both terms share it
    and the backward reuses it (saved by the forward, O(N^2) memory, up to N = 4096; above,
    the backward forms it again). Other backends (cuda, triton) add the two terms' ops.
    """
    distance_weight = check_weight("distance_weight", distance_weight)
    angle_weight = check_weight("angle_weight", angle_weight)
    if distance_weight == 0 and angle_weight == 0:
        raise ValueError("rkd_loss needs distance_weight or angle_weight > 0, got both 0")
    min_rows = 3 if angle_weight != 0 else 2
    s, t = check_feature_pair(student, teacher, min_rows, "rkd_loss")
    if distance_weight == 0:
        return angle_weight * _call("rkd_angle", s, t)
    if angle_weight == 0:
        return distance_weight * _call("rkd_distance", s, t)
    # the combined op where the backend that runs the angle term implements it
    backend = _dispatch.select("rkd_angle", s, t)[0]
    combined = _dispatch.runnable("rkd_loss", backend, s, t, distance_weight, angle_weight)
    if combined is not None:
        with _autocast_off(s.device):
            return combined(s, t, distance_weight, angle_weight)
    return distance_weight * _call("rkd_distance", s, t) + angle_weight * _call("rkd_angle", s, t)


def gather_features(student: Tensor, teacher: Tensor, min_rows: int, what: str, group=None):
    """Validate local features and all-gather them: (s_all, t_all, start, stop).

    ``[start, stop)`` are this rank's rows in the global batch. Raises ValueError on every
    rank when the widths differ across ranks or the global batch has fewer than
    ``min_rows`` rows.
    """
    s, t = check_feature_pair(student, teacher, 0, what)
    shapes = _distributed.shapes_of(s, s.shape[1], t.shape[1], group=group)
    if len({tuple(shape[1:]) for shape in shapes}) != 1:
        seen = ", ".join(f"rank {r}: {shape}" for r, shape in enumerate(shapes))
        raise ValueError(
            f"{what}(gather=True): student/teacher widths must agree across ranks, got "
            f"[rows, student width, teacher width] = {seen}"
        )
    counts = [shape[0] for shape in shapes]
    if sum(counts) < min_rows:
        raise ValueError(
            f"{what} needs at least {min_rows} samples in the global batch, got "
            f"{sum(counts)} (local batch sizes {counts})"
        )
    rank = _distributed.dist.get_rank(group)
    start = sum(counts[:rank])
    s_all = _distributed.gather_rows(s, counts, group)
    t_all = _distributed.gather_rows(t, counts, group)
    return s_all, t_all, start, start + counts[rank]


def rkd_angle_global(s_all: Tensor, t_all: Tensor, start: int, stop: int, group=None) -> Tensor:
    """The angle loss of gathered features: this rank's vertices, all-reduced."""
    partial = _call("rkd_angle_vertices", s_all, t_all, start, stop)
    return _distributed.all_reduce_sum(partial, group)


def vkd_loss(
    projected_student: Tensor, teacher: Tensor, normalize: str | None = "standardize"
) -> Tensor:
    """VkD representation loss (semantics 4): SmoothL1 mean between the projected student and the
    normalised teacher features.

    Miles, Elezi, Deng, "VkD: Improving Knowledge Distillation using Orthogonal
    Projections", CVPR 2024 (roymiles/VkD). Both inputs (B, Dt). ``normalize``:
    "standardize" (per-sample LayerNorm of the teacher, default), "batch_standardize"
    (per-channel over the batch, both sides, B >= 2), "whiten" (ZCA of the teacher over the
    batch, B >= 2) or None.
    """
    check_tensor("projected_student", projected_student)
    check_tensor("teacher", teacher)
    check_same_device(projected_student=projected_student, teacher=teacher)
    check_choice("normalize", normalize, VKD_NORMALIZATIONS)
    if projected_student.dim() != 2 or projected_student.shape != teacher.shape:
        raise ValueError(
            "projected_student and teacher must both be (B, D) with equal shapes, got "
            f"{tuple(projected_student.shape)} and {tuple(teacher.shape)}"
        )
    b, d = teacher.shape
    if b == 0 or d == 0:
        raise ValueError(f"teacher must be non-empty, got shape {tuple(teacher.shape)}")
    if normalize in ("batch_standardize", "whiten") and b < 2:
        raise ValueError(f"normalize={normalize!r} needs a batch of at least 2, got shape {(b, d)}")
    return _call("vkd_loss", projected_student, teacher, normalize)


def fused_linear_distill(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    *,
    divergence: str,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    soft_loss_weight: float = 1.0,
    hard_loss_weight: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
) -> Tensor:
    """Distillation loss of two linear LM heads without materialising their logits
    (semantics 3.2): logits ``z = x W^T + b`` are formed in row chunks, never (T, V) at once.

    Per token: ``soft_loss_weight * soft + hard_loss_weight * CE(z_s, labels)``, with
    soft = ``T^2 KL(p_t || p_s)`` ("kl", Hinton KD as :func:`kd_loss`), ``KL(p_s || p_t)``
    ("reverse_kl") or the generalised JSD with ``beta`` ("jsd", :func:`jsd_loss`: TRL's
    convention, no T^2; beta = 0 / 1 give the forward / reverse KL). The cross-entropy uses
    the student's logits at temperature 1 (Liger-Kernel's hard loss).

    "dist" is not a per-token sum: it is DIST (:func:`dist_loss`, softmax, T^2) over the kept
    tokens, ``soft_loss_weight * T^2 * (inter_weight * inter + intra_weight * intra) +
    hard_loss_weight * mean CE``, with inter = 1 - mean over tokens of the Pearson
    correlation across the vocabulary and intra = 1 - mean over the vocabulary of the
    Pearson correlation across the kept tokens; dropped tokens are removed from both terms.
    One kept token gives intra = 1 exactly (zero gradient), none gives NaN. The intra term
    needs column statistics over every token, so the chunked path reads the chunks twice
    (the head GEMMs run twice when a gradient is needed).

    Args:
        student_input: (..., H) hidden states; the leading dims are the tokens.
        student_weight: (V, H) student lm_head weight; ``student_bias``: optional (V,).
        teacher_input: (..., Ht) teacher hidden states, same leading shape.
        teacher_weight: (V, Ht); ``teacher_bias``: optional (V,). Teacher tensors that
            require grad receive gradients (two more GEMMs per chunk); freeze the teacher
            or compute its hidden states under ``torch.no_grad()`` to skip them.
        divergence: "kl", "reverse_kl", "jsd" or "dist".
        labels: optional integer tokens (leading shape); ``ignore_index`` drops a token.
        mask: optional bool (leading shape); False drops a token.
        beta: in [0, 1], the teacher's weight in the JSD mixture ("jsd" only).
        temperature: T > 0, finite.
        reduction: "batchmean" (sum / kept tokens), "sum" or "none" ((T,) per token, 0 on
            dropped ones). "dist" takes "batchmean" only (ValueError otherwise).
        soft_loss_weight, hard_loss_weight: weights of the two terms (hard needs labels).
        chunk_size: rows per chunk; None picks it from a memory budget.
        inter_weight, intra_weight: finite reals, DIST's beta and gamma (official defaults
            1 and 1); "dist" only.

    Returns:
        A scalar (or (T,)) in promote_types(inputs, float32). Gradients reach
        ``student_input``, ``student_weight`` and ``student_bias`` (and the teacher's
        tensors that require grad).
    """
    xs, xt, labels, mask = _fused_linear.check_inputs(
        student_input, student_weight, student_bias, teacher_input, teacher_weight,
        teacher_bias, labels, mask,
    )  # fmt: skip
    options = _fused_linear.check_options(
        divergence, beta, temperature, reduction, soft_loss_weight, hard_loss_weight,
        ignore_index, labels, inter_weight, intra_weight,
    )  # fmt: skip
    _fused_linear.check_chunk_size(chunk_size)
    with _autocast_off(xs.device):
        return _fused_linear.fused_linear_distill(
            xs, student_weight, student_bias, xt, teacher_weight, teacher_bias, labels, mask,
            options, chunk_size,
        )  # fmt: skip


__all__ = [
    "kd_loss",
    "per_sample_kl",
    "jsd_loss",
    "dist_loss",
    "fused_linear_distill",
    "rkd_distance",
    "rkd_angle",
    "rkd_loss",
    "vkd_loss",
]
