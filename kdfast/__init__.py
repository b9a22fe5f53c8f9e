"""kdfast: fast, exact knowledge-distillation losses for PyTorch.

Public surface, all reachable after ``import kdfast``:

* :mod:`kdfast.functional`: kd_loss, per_sample_kl, dist_loss, rkd_distance, rkd_angle, vkd_loss
* :mod:`kdfast.losses`: KDLoss, DeiTDistillationLoss, DISTLoss, RKDDistanceLoss, RKDAngleLoss,
  RKDLoss, VkDLoss, BNStatisticsLoss
* :mod:`kdfast.compat`: the official codebases' loss classes under their own names and
  signatures (RkdDistance, RKdAngle, DIST, KLDivergence, DistillationLoss, RKDLoss,
  DistillKL, VkDLoss)
* :mod:`kdfast.linalg`: expm, expm_frechet
* :mod:`kdfast.nn`: OrthogonalProjector, DistillationTokenHead
* :mod:`kdfast.sampling`: PrioritizedReplayBuffer and the SSD-KD helpers
* :mod:`kdfast.training`: distill (a small student-training loop), accuracy
* :mod:`kdfast.datafree`: SSD-KD data-free distillation (Generator, SSDKDSynthesizer)
* :func:`use_backend` / :func:`set_backend`: force a backend (see ``python -m kdfast.info``)
* :func:`empty_cache`: free the CPU logit kernels' idle recycled gradient buffers
"""

__version__ = "0.1.0"

from kdfast import (  # noqa: E402,F401
    compat,
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


def empty_cache() -> int:
    """Free the idle recycled gradient buffers of kdfast's CPU logit kernels.

    The CPU kd_loss / dist_loss kernels hand out gradients of 16 MiB or more from a small
    pool (at most two idle buffers) so that a training loop does not pay page faults for a
    fresh (rows, C) gradient at every step; like ``torch.cuda.empty_cache()``, this returns
    that memory to the system. Returns the bytes released (0 without the C++ extension).
    """
    from kdfast import _extension

    return 0 if _extension._C is None else int(_extension._C.release_cached_outputs())


__all__ = [
    "compat",
    "datafree",
    "empty_cache",
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
