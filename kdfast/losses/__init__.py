"""``nn.Module`` drop-ins for every kdfast loss; ``forward(student, teacher)`` unless stated.

Each module calls :mod:`kdfast.functional`, so it follows the one dispatch point. Every
family module's ``__all__`` is exported here: a new loss is one entry in its family's
``__all__``.
"""

from kdfast.losses import bn_statistics, dist, fused_linear, kd, rkd, vkd
from kdfast.losses.bn_statistics import *  # noqa: F403
from kdfast.losses.dist import *  # noqa: F403
from kdfast.losses.fused_linear import *  # noqa: F403
from kdfast.losses.kd import *  # noqa: F403
from kdfast.losses.rkd import *  # noqa: F403
from kdfast.losses.vkd import *  # noqa: F403

__all__ = [
    *bn_statistics.__all__,
    *dist.__all__,
    *fused_linear.__all__,
    *kd.__all__,
    *rkd.__all__,
    *vkd.__all__,
]
