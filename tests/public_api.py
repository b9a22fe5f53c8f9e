"""The public (student, teacher) losses as data, for tests that iterate over every op and backend.

The ops come from one place, the contracts each ``kdfast/ops/<op>.py`` declares
(:data:`kdfast.ops._samples.CONTRACTS`): an op whose public function lives in
``kdfast.functional`` takes a (student, teacher) pair, and its function is the contract's.
:data:`PUBLIC_OPS` adds what the contracts do not say (the one table of how the hostile
input, layout, compile and autocast tests call each op); ``tests/test_hostile.py`` fails for
a pair op missing from it. Backends: every one registered for the op
(``kdfast._dispatch``), including kernels merged later.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from conftest import backends_for

import kdfast.ops  # noqa: F401  registers every op and declares its contract
from kdfast.ops._samples import CONTRACTS


def public_function(op: str) -> Callable:
    """The public function of ``op`` (its contract's)."""
    return CONTRACTS[op].function()


def _takes_pair(op: str) -> bool:
    """Whether ``op``'s public function is a loss of (student, teacher) tensors: a function of
    ``kdfast.functional`` whose second parameter is the teacher's."""
    if not CONTRACTS[op].public.startswith("kdfast.functional:"):
        return False
    params = list(inspect.signature(public_function(op)).parameters)
    return len(params) >= 2 and params[1].startswith("teacher")


#: the contracts whose public function takes a (student, teacher) pair
PAIR_OPS = sorted(op for op in CONTRACTS if _takes_pair(op))
#: ops without a (student, teacher) public loss: tested in ops/test_expm.py,
#: ops/test_fused_linear_distill.py (hidden states and weights, not a pair), test_hostile.py,
#: and the sharded angle term in test_distributed.py
NON_PAIR_OPS = sorted(set(CONTRACTS) - set(PAIR_OPS))


@dataclass(frozen=True)
class PublicOp:
    """How to call an op's public function on a (student, teacher) pair of 2-D tensors."""

    op: str
    min_rows: int
    logits: bool  # (N, C, *) treated as rows (True) or features flattened to (N, -1)
    same_width: bool  # student and teacher must have the same width
    options: dict = field(default_factory=dict)  # keyword arguments of every call

    def __post_init__(self):
        # resolved once: torch.compile traces call() without the import behind it
        object.__setattr__(self, "function", public_function(self.op))

    def call(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The loss as a scalar (a per-row loss summed)."""
        loss = self.function(s, t, **self.options)
        return loss if loss.dim() == 0 else loss.sum()


PUBLIC_OPS: dict[str, PublicOp] = {
    p.op: p
    for p in (
        PublicOp("kd_loss", 1, True, True, {"temperature": 2.0}),
        PublicOp("per_sample_kl", 1, True, True, {"temperature": 2.0}),
        PublicOp("jsd_loss", 1, True, True, {"beta": 0.3, "temperature": 2.0}),
        PublicOp("dist_loss", 1, True, True, {"temperature": 2.0}),
        PublicOp("rkd_distance", 2, False, False),
        PublicOp("rkd_angle", 3, False, False),
        PublicOp("rkd_loss", 3, False, False),
        PublicOp("vkd_loss", 1, False, True, {"normalize": "standardize"}),
    )
}

OP_BACKENDS = [(op, backend) for op in PUBLIC_OPS for backend in backends_for(op)]
