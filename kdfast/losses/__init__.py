"""``nn.Module`` drop-ins for every kdfast loss; ``forward(student, teacher)`` unless stated.

Each module calls :mod:`kdfast.functional`, so it follows the one dispatch point.
"""

from kdfast.losses.bn_statistics import BNStatisticsLoss
from kdfast.losses.dist import DISTLoss
from kdfast.losses.kd import DeiTDistillationLoss, JSDLoss, KDLoss
from kdfast.losses.rkd import RKDAngleLoss, RKDDistanceLoss, RKDLoss
from kdfast.losses.vkd import VkDLoss

__all__ = [
    "BNStatisticsLoss",
    "DISTLoss",
    "DeiTDistillationLoss",
    "JSDLoss",
    "KDLoss",
    "RKDAngleLoss",
    "RKDDistanceLoss",
    "RKDLoss",
    "VkDLoss",
]
