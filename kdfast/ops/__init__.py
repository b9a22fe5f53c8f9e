"""Custom ops (torch.library) of every compiled backend, one module per op.

Importing this package registers fake kernels and autograd for the ops that were built
and declares them to the dispatcher; ops of backends that are unavailable are skipped.
"""

from kdfast.ops import (  # noqa: F401
    _autocast,
    dist_loss,
    expm,
    kd_loss,
    rkd_angle,
    rkd_distance,
)

# Keep last: derives autocast rules from every op registered by the imports above.
_autocast.register_all()
