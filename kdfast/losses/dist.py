"""DIST as an ``nn.Module`` (semantics 2)."""

from __future__ import annotations

from torch import Tensor, nn

from kdfast import functional as KF
from kdfast._deprecation import renamed_keywords
from kdfast._validation import check_bool


class DISTLoss(nn.Module):
    """DIST: ``beta * T^2 * inter + gamma * T^2 * intra`` (semantics 2).

    Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher",
    NeurIPS 2022 (hunto/DIST_KD). inter = 1 - mean over samples of the Pearson correlation
    of student and teacher predictions across classes; intra = 1 - mean over classes of the
    Pearson correlation across the batch (the paper calls the temperature tau). Official
    recipes: ImageNet T = 1, CIFAR-100 T = 4, total = CE + 2 * DIST.

    Args:
        beta: weight of the inter (per-sample) term. Default 1.
        gamma: weight of the intra (per-class) term. Default 1.
        temperature: T > 0. Default 1 (``tau=``: deprecated alias).
        temperature_squared: scale both terms by T^2 (classification recipe). Default True;
            False matches the segmentation / detection code (no T^2 factor;
            ``tau_squared=``: deprecated alias).
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

        >>> loss = DISTLoss(temperature=4.0)(student_logits, teacher_logits.detach())
    """

    @renamed_keywords(tau="temperature", tau_squared="temperature_squared")
    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        activation: str = "softmax",
        *,
        gather: bool = False,
        process_group=None,
    ) -> None:
        super().__init__()
        self.gather = check_bool("gather", gather)
        self.process_group = process_group
        self.beta, self.gamma, self.temperature = KF.check_dist_options(
            beta, gamma, temperature, temperature_squared, activation
        )
        self.temperature_squared = temperature_squared
        self.activation = activation

    @property
    def tau(self) -> float:
        """Deprecated name of :attr:`temperature` (read-only)."""
        return self.temperature

    @property
    def tau_squared(self) -> bool:
        """Deprecated name of :attr:`temperature_squared` (read-only)."""
        return self.temperature_squared

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return KF.dist_loss(
            student,
            teacher,
            self.beta,
            self.gamma,
            self.temperature,
            self.temperature_squared,
            self.activation,
            mask,
            gather=self.gather,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, "
            f"temperature_squared={self.temperature_squared}, activation={self.activation!r}, "
            f"gather={self.gather}"
        )
