"""kdfast: fast, exact knowledge-distillation losses for PyTorch.

Public surface, all reachable after ``import kdfast``:

* :mod:`kdfast.functional`: kd_loss, per_sample_kl, dist_loss, rkd_distance, rkd_angle, vkd_loss
* :mod:`kdfast.losses`: KDLoss, DeiTDistillationLoss, DISTLoss, RKDDistanceLoss, RKDAngleLoss,
  RKDLoss, VkDLoss, BNStatisticsLoss
* :mod:`kdfast.linalg`: expm, expm_frechet
* :mod:`kdfast.nn`: OrthogonalProjector, DistillationTokenHead
* :mod:`kdfast.sampling`: PrioritizedReplayBuffer and the SSD-KD helpers
* :mod:`kdfast.training`: distill (a small student-training loop), accuracy
* :mod:`kdfast.datafree`: SSD-KD data-free distillation (Generator, SSDKDSynthesizer)
* :func:`use_backend` / :func:`set_backend`: force a backend (see ``python -m kdfast.info``)
"""

__version__ = "0.1.0"

from kdfast import (  # noqa: E402,F401
    datafree,
    functional,
    linalg,
    losses,
    nn,
    ops,
    sampling,
    training,
)
from kdfast._dispatch import set_backend, use_backend  # noqa: E402

__all__ = [
    "datafree",
    "functional",
    "linalg",
    "losses",
    "nn",
    "sampling",
    "set_backend",
    "training",
    "use_backend",
    "__version__",
]
