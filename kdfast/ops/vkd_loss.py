"""The ``vkd_loss`` op (semantics 4): its implementation (reference only: a SmoothL1 mean of a
(B, D) difference has nothing to fuse) and its samples."""

from __future__ import annotations

import torch

from kdfast import _dispatch
from kdfast.ops._samples import BadInput, Contract, Sample, declare, randn
from kdfast.reference.vkd_loss import vkd_loss as reference

_dispatch.implement("vkd_loss", "reference", reference)


def _pair(normalize, rows=8, scale=1.0, offset=0.0, cols=6):
    def make(gen):
        return (randn(gen, rows, cols), scale * randn(gen, rows, cols) + offset, normalize), {}

    return make


declare(
    Contract(
        "vkd_loss",
        "kdfast.functional:vkd_loss",
        (
            Sample("standardize", _pair("standardize")),
            Sample("tiny", _pair("standardize", rows=3, cols=4), frozenset({"small"})),
            Sample("batch_standardize", _pair("batch_standardize")),
            Sample("tiny_batch", _pair("batch_standardize", rows=3, cols=4), frozenset({"small"})),
            Sample("whiten", _pair("whiten", rows=16)),
            Sample("none", _pair(None)),
            Sample(
                "offset_teacher",
                _pair("standardize", scale=3.0, offset=50.0),
                frozenset({"float32_and_up"}),
            ),  # fmt: skip
            Sample("two_rows", _pair("batch_standardize", rows=2)),
        ),
        bad_inputs=(
            BadInput(
                "shapes_differ",
                lambda: ((torch.randn(4, 3), torch.randn(4, 5)), {}),
                ValueError,
                "equal shapes",
            ),
            BadInput(
                "normalize",
                lambda: ((torch.randn(4, 3), torch.randn(4, 3)), {"normalize": "zca"}),
                ValueError,
                "normalize must be one of",
            ),
            BadInput(
                "whiten_one_row",
                lambda: ((torch.randn(1, 3), torch.randn(1, 3)), {"normalize": "whiten"}),
                ValueError,
                "batch of at least 2",
            ),
        ),
    )
)
