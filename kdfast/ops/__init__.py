"""Custom ops (torch.library) of every compiled backend, one module per op.

Importing this package registers fake kernels and autograd for the ops that were built
and declares them to the dispatcher; ops of backends that are unavailable are skipped.
"""

from kdfast.ops import dist_loss, expm, kd_loss, rkd_distance  # noqa: F401
