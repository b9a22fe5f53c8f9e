"""The option strings of kdfast's losses, defined once.

Validation (:mod:`kdfast._validation`), the public functions and modules, and the kernels
all import them from here; this module imports nothing, so any module may import it
without a cycle.
"""

from __future__ import annotations

#: ``reduction`` of kd_loss and jsd_loss
KD_REDUCTIONS = ("batchmean", "sum", "mean", "none")
#: what kd_loss's teacher tensor holds (``teacher_kind``); the position is the kernels'
#: constexpr code (csrc/kd_loss.h)
KD_TEACHER_KINDS = ("logits", "probs", "log_probs")
#: ``activation`` of dist_loss
DIST_ACTIVATIONS = ("softmax", "sigmoid")
#: ``normalize`` of vkd_loss
VKD_NORMALIZATIONS = ("standardize", "batch_standardize", "whiten", None)
#: ``distillation_type`` of DeiTDistillationLoss
DEIT_DISTILLATION_TYPES = ("none", "soft", "hard")
#: ``divergence`` of fused_linear_distill
FUSED_DIVERGENCES = ("kl", "reverse_kl", "jsd", "dist")
#: ``reduction`` of fused_linear_distill (over the kept tokens)
FUSED_REDUCTIONS = ("batchmean", "sum", "none")
