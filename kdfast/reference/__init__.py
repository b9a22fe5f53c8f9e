"""The reference backend: readable, differentiable PyTorch, the executable spec.

Each module holds one op under the op's name; autograd does the backward, so the
reference is an independent gradient oracle for every kernel. Functions here receive
inputs already validated by :mod:`kdfast.functional` (2-D, one device, original dtypes)
and return the loss in promote_types(student, teacher, float32).
"""

from kdfast import _dispatch
from kdfast.reference.dist_loss import dist_loss
from kdfast.reference.kd_loss import kd_loss, per_sample_kl
from kdfast.reference.rkd_angle import rkd_angle, rkd_angle_vertices
from kdfast.reference.rkd_distance import rkd_distance
from kdfast.reference.vkd_loss import vkd_loss

REFERENCE_OPS = {
    "kd_loss": kd_loss,
    "per_sample_kl": per_sample_kl,
    "dist_loss": dist_loss,
    "rkd_distance": rkd_distance,
    "rkd_angle": rkd_angle,
    "rkd_angle_vertices": rkd_angle_vertices,
    "vkd_loss": vkd_loss,
}

for _name, _fn in REFERENCE_OPS.items():
    _dispatch.implement(_name, "reference", _fn)
