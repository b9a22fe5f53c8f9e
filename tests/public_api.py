"""The public (student, teacher) losses as data, for tests that iterate over every op and backend.

Each entry maps a dispatcher op name to how its public function is called, so the hostile
input, layout, compile and autocast tests cover every backend registered for the op
(``kdfast._dispatch._IMPLS``), including kernels merged later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from conftest import compiled_backends

import kdfast.functional as KF
from kdfast import _dispatch


@dataclass(frozen=True)
class PublicOp:
    """How to call an op's public function on a (student, teacher) pair of 2-D tensors."""

    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # returns a scalar
    min_rows: int
    logits: bool  # (N, C, *) treated as rows (True) or features flattened to (N, -1)
    same_width: bool  # student and teacher must have the same width


PUBLIC_OPS: dict[str, PublicOp] = {
    "kd_loss": PublicOp(lambda s, t: KF.kd_loss(s, t, 2.0), 1, True, True),
    "per_sample_kl": PublicOp(lambda s, t: KF.per_sample_kl(s, t, 2.0).sum(), 1, True, True),
    "jsd_loss": PublicOp(lambda s, t: KF.jsd_loss(s, t, 0.3, 2.0), 1, True, True),
    "dist_loss": PublicOp(lambda s, t: KF.dist_loss(s, t, tau=2.0), 1, True, True),
    "rkd_distance": PublicOp(KF.rkd_distance, 2, False, False),
    "rkd_angle": PublicOp(KF.rkd_angle, 3, False, False),
    "vkd_loss": PublicOp(lambda s, t: KF.vkd_loss(s, t, "standardize"), 1, False, True),
}

#: ops without a (student, teacher) public loss: tested in ops/test_expm.py / test_hostile.py, and
#: the sharded angle term in test_distributed.py
NON_PAIR_OPS = {"expm", "expm_frechet", "rkd_angle_vertices"}


def backends_of(op: str) -> list[str]:
    """Every backend that runs ``op`` on CPU in this run: the reference and the compiled ones."""
    impls = _dispatch._IMPLS.get(op, {})
    return ["reference"] + [b for b in compiled_backends("cpu") if b in impls]


OP_BACKENDS = [(op, backend) for op in PUBLIC_OPS for backend in backends_of(op)]
