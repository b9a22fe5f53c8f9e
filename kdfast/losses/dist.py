"""DIST as an ``nn.Module`` (semantics 2)."""

from __future__ import annotations

from torch import Tensor, nn

from kdfast import functional as KF
from kdfast._constants import DIST_ACTIVATIONS
from kdfast._validation import check_choice, check_positive


class DISTLoss(nn.Module):
    """DIST: ``beta * tau^2 * inter + gamma * tau^2 * intra`` (semantics 2).

    Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher",
    NeurIPS 2022 (hunto/DIST_KD). inter = 1 - mean over samples of the Pearson correlation
    of student and teacher predictions across classes; intra = 1 - mean over classes of the
    Pearson correlation across the batch. Official recipes: ImageNet tau = 1, CIFAR-100
    tau = 4, total = CE + 2 * DIST.

    Args:
        beta: weight of the inter (per-sample) term. Default 1.
        gamma: weight of the intra (per-class) term. Default 1.
        tau: temperature > 0. Default 1.
        tau_squared: scale both terms by tau^2 (classification recipe). Default True;
            False matches the segmentation / detection code (no tau factor).
        activation: "softmax" over the class dim (default) or element-wise "sigmoid"
            (detection heads).
        gather: False (default) computes over the local batch. True, when torch.distributed
            is initialised, computes over the concatenated batch of every rank: per-column
            moments are all-reduced (length 5C + 2 in two rounds), no logits are gathered.
            Each rank's input gradient is world_size times the single-process gradient of
            its slice, so DDP's averaging gives the global-batch parameter gradients
            (:mod:`kdfast.distributed`).
        process_group: the group to reduce over (default: the world).

    Shapes:
        student, teacher: (B, C) or (N, C, *) logits, class dim 1; (N, C, *) is treated as
        N * prod(*) rows. mask: optional bool (rows,), False rows drop out (all-False gives
        NaN). Output: a scalar in promote_types(student, teacher, float32).

    Example::

        >>> loss = DISTLoss(tau=4.0)(student_logits, teacher_logits.detach())
    """

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        tau: float = 1.0,
        tau_squared: bool = True,
        activation: str = "softmax",
        *,
        gather: bool = False,
        process_group=None,
    ) -> None:
        super().__init__()
        if not isinstance(gather, bool):
            raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
        self.gather = gather
        self.process_group = process_group
        for name, weight in (("beta", beta), ("gamma", gamma)):
            if not isinstance(weight, (int, float)) or isinstance(weight, bool):
                raise TypeError(f"{name} must be a real number, got {weight!r}")
        check_positive("tau", tau)
        check_choice("activation", activation, DIST_ACTIVATIONS)
        if not isinstance(tau_squared, bool):
            raise TypeError(f"tau_squared must be a bool, got {type(tau_squared).__name__}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.tau_squared = tau_squared
        self.activation = activation

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return KF.dist_loss(
            student,
            teacher,
            self.beta,
            self.gamma,
            self.tau,
            self.tau_squared,
            self.activation,
            mask,
            gather=self.gather,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}, "
            f"tau_squared={self.tau_squared}, activation={self.activation!r}, "
            f"gather={self.gather}"
        )
