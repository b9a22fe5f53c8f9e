"""Autocast rules for every kdfast custom op.

kdfast's losses compute their statistics in promote_types(inputs, float32) (semantics 0), never in
autocast's lower precision. :mod:`kdfast.functional` runs every op with autocast disabled; in
addition each forward custom op gets a ``torch.library.register_autocast`` rule, so that a
direct call (``torch.ops.kdfast.<op>``) under ``torch.autocast`` also runs with autocast
disabled, its half inputs cast to float32 (float64 inputs are left alone). Without the rule
the Python reference ops (e.g. ``expm_reference``) would run their matmuls in float16 inside
the op and lose all accuracy (NaN for the exponential).

The rules are derived from the dispatcher table, so compiled ops merged later get them:
every implementation whose function is a custom op (an ``OpOverload`` such as
``torch.ops.kdfast.rkd_distance_cpp.default`` or a ``CustomOpDef``), for the device types
its backend runs on. Backward ops are not registered: autocast is off in backward passes.
"""

from __future__ import annotations

import torch

from kdfast import _dispatch, _extension

#: custom ops reached through Python wrappers (not visible in the dispatcher table)
EXTRA_OPS = {"kdfast::expm_reference": None, "kdfast::expm_frechet_reference": None}
#: compiled ops reached through Python wrappers (kdfast/ops/expm.py, rkd_loss.py), when the
#: extension is built: the ATen path's matmuls and solves would otherwise run in autocast's
#: half precision
EXTRA_COMPILED_OPS = (
    "kdfast::expm_cpp",
    "kdfast::expm_frechet_cpp",
    "kdfast::expm_save_cpp",
    "kdfast::expm_small_cpp",
    "kdfast::expm_frechet_small_cpp",
    "kdfast::rkd_loss_cpp",
)
AUTOCAST_DEVICES = ("cpu", "cuda")

_registered: set[tuple[str, str]] = set()


def _qualname(fn: object) -> str | None:
    if isinstance(fn, torch._ops.OpOverload):
        return fn._schema.name
    if isinstance(fn, torch._library.custom_ops.CustomOpDef):
        return fn._qualname
    return None


def _register(qualname: str, devices) -> None:
    for device in AUTOCAST_DEVICES:
        if devices is not None and device not in devices:
            continue
        if (qualname, device) in _registered or not torch.amp.is_autocast_available(device):
            continue
        torch.library.register_autocast(qualname, device, torch.float32)
        _registered.add((qualname, device))


def register_all() -> list[tuple[str, str]]:
    """Register autocast rules for every custom op kdfast dispatches to; idempotent.

    Returns the (op, device type) pairs registered so far.
    """
    for impls in _dispatch._IMPLS.values():
        for backend, impl in impls.items():
            name = _qualname(impl.fn)
            if name is None:
                continue
            devices = impl.devices or _dispatch.BACKENDS[backend].devices
            _register(name, devices)
    for name, devices in EXTRA_OPS.items():
        _register(name, devices)
    if _extension.unavailable_reason() is None:
        for name in EXTRA_COMPILED_OPS:
            _register(name, None)
    return sorted(_registered)
