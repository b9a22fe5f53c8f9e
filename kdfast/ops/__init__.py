"""Every op's registration, one module per op (``kdfast/ops/<op>.py``): its custom ops
(fake kernels, autograd), every backend's implementation declared to :mod:`kdfast._dispatch`,
and its sample inputs for the contract suite (:mod:`kdfast.ops._samples`). Implementations
of backends that are unavailable in this process are skipped.
"""

from kdfast.ops import (  # noqa: F401
    _autocast,
    dist_loss,
    expm,
    kd_loss,
    rkd_angle,
    rkd_distance,
    vkd_loss,
)

# Keep last: derives autocast rules from every op registered by the imports above.
_autocast.register_all()
