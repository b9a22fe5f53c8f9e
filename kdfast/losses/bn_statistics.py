"""BatchNorm-statistics prior (DeepInversion), the L_BN term of SSD-KD's generator loss.

Reference: Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion",
CVPR 2020 (NVlabs/DeepInversion); used by Liu et al., "Small Scale Data-Free Knowledge
Distillation", CVPR 2024. Semantics: docs/semantics.md section 5.

For each BatchNorm layer l of the (teacher) model, on the layer's input x:
mu = mean over every dim but the channel dim 1, var = biased variance over the same dims,
r_l = ||running_var - var||_2 + ||running_mean - mu||_2 (plain, not squared, L2 norms), and
L_BN = sum_l weight_l * r_l.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdfast._validation import compute_dtype, is_real

__all__ = ["BNStatisticsLoss", "bn_statistics_distance"]


def bn_statistics_distance(x: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """r = ||running_var - var||_2 + ||running_mean - mu||_2 for a BatchNorm input x.

    x: (N, C, *) (e.g. (N, C) or (N, C, L) for BatchNorm1d, (N, C, H, W) for 2d,
    (N, C, D, H, W) for 3d); running_mean, running_var: (C,). Statistics are per channel over
    every dim but dim 1, the variance biased; computed and returned in
    promote_types(x, running stats, float32), differentiable w.r.t. x.
    """
    dtype = compute_dtype(x, running_mean, running_var)
    dims = [0, *range(2, x.dim())]
    var, mu = torch.var_mean(x.to(dtype), dim=dims, correction=0)
    return torch.linalg.vector_norm(running_var.to(dtype) - var) + torch.linalg.vector_norm(
        running_mean.to(dtype) - mu
    )


def _resolve_weights(
    names: list[str], layer_weights: Sequence[float] | Mapping[str, float] | None
) -> list[float]:
    if layer_weights is None:
        weights = [1.0] * len(names)
    elif isinstance(layer_weights, Mapping):
        unknown = sorted(set(layer_weights) - set(names))
        if unknown:
            raise ValueError(
                f"layer_weights names {unknown} are not BatchNorm layers of the model; "
                f"its BatchNorm layers are {names}"
            )
        weights = [layer_weights.get(name, 1.0) for name in names]
    elif isinstance(layer_weights, Sequence) and not isinstance(layer_weights, str):
        if len(layer_weights) != len(names):
            raise ValueError(
                f"layer_weights must have one weight per BatchNorm layer ({len(names)}: {names}), "
                f"got {len(layer_weights)}"
            )
        weights = list(layer_weights)
    else:
        raise TypeError(
            f"layer_weights must be None, a sequence or a dict name -> weight, "
            f"got {type(layer_weights).__name__}"
        )
    for name, w in zip(names, weights, strict=True):
        if not is_real(w) or not math.isfinite(w):
            raise ValueError(f"layer_weights[{name!r}] must be a finite number, got {w!r}")
    return [float(w) for w in weights]


class _Capture:
    """What the hooks of one :class:`BNStatisticsLoss` captured: r_l of the latest pass.

    Copies (deepcopy, pickle) start empty: the captured values belong to one forward pass
    (and hold its autograd graph, which can be neither copied nor saved).
    """

    def __init__(self) -> None:
        self.latest: dict[int, Tensor] = {}  # layer position -> r of the latest pass

    def __getstate__(self) -> dict:
        return {"latest": {}}

    def __deepcopy__(self, memo: dict) -> _Capture:
        return _Capture()


class _HookToCapture:
    """Base of the hooks: a picklable callable holding a weak reference to its capture.

    The loss holds the capture; the model holds only the hooks. A hook copied or pickled
    with its model but without its loss finds no capture and does nothing (its weak
    reference is dead); copied or pickled together with the loss (one deepcopy or one
    pickle of an object holding both), it feeds the copied loss.
    """

    def __init__(self, capture: _Capture | None) -> None:
        self._capture = weakref.ref(capture) if capture is not None else None

    def capture(self) -> _Capture | None:
        return self._capture() if self._capture is not None else None

    def _args(self) -> tuple:
        return ()

    def __reduce__(self):
        return type(self), (self.capture(), *self._args())

    def __deepcopy__(self, memo: dict):
        capture = self.capture()
        twin = None if capture is None else copy.deepcopy(capture, memo)
        return type(self)(twin, *self._args())


class _StartPass(_HookToCapture):
    """Forward pre-hook of the model: a new pass clears what earlier passes captured."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        capture = self.capture()
        if capture is not None:
            capture.latest = {}


class _LayerStatistics(_HookToCapture):
    """Forward hook of the BatchNorm layer at ``position``: captures its r."""

    def __init__(self, capture: _Capture | None, position: int) -> None:
        super().__init__(capture)
        self.position = position

    def _args(self) -> tuple:
        return (self.position,)

    def __call__(self, layer: _BatchNorm, args: tuple, output: Tensor) -> None:
        capture = self.capture()
        if capture is not None:
            capture.latest[self.position] = bn_statistics_distance(
                args[0], layer.running_mean.detach(), layer.running_var.detach()
            )


class BNStatisticsLoss(nn.Module):
    """L_BN = sum_l weight_l * r_l over the BatchNorm layers of ``model`` (DeepInversion).

    Registers forward hooks on every BatchNorm layer of ``model`` (``nn.BatchNorm1d/2d/3d``,
    ``nn.SyncBatchNorm``: every ``_BatchNorm``). Run ``model(x)``, then call this module with
    no arguments: it returns the loss of that forward pass, a 0-dim tensor differentiable
    w.r.t. ``x`` (and the model's earlier parameters), in promote_types(activations, float32).

    Only the latest forward pass of ``model`` counts: its start clears what earlier passes
    captured. A layer that the pass skipped contributes nothing; a layer called several
    times in one pass contributes its last call. Use the model in eval mode, as DeepInversion
    does (in train mode BatchNorm updates its running statistics with the batch before the
    hook reads them). The loss keeps no reference to the model, its layers or their
    parameters (only removable handles of its hooks): it has no parameters or buffers of
    its own.

    Args:
        model: the network whose BatchNorm running statistics are the prior (the teacher).
        layer_weights: None (every weight 1), a sequence with one weight per BatchNorm layer
            in module order (``named_modules``), or a dict layer name -> weight (unnamed
            layers keep 1). DeepInversion's ImageNet code weights the first layer by 10.

    ``detach()`` (alias ``remove()``) removes the hooks; the loss is also a context manager
    that removes them on exit.

    Copies and checkpoints: the hooks are module-level callables, so an attached teacher can
    be pickled, ``torch.save``-d and deep-copied. A copy of the teacher made without the loss
    keeps inert copies of the hooks: they compute nothing and never write into the original
    loss (create ``BNStatisticsLoss(copy)`` for it). A copy of the loss made without its
    teacher is not attached to any model and raises when called. Copied together (one
    ``copy.deepcopy`` or one pickle of an object holding both, e.g. a dict or a module with
    both as attributes), the copied loss follows the copied teacher. A copy never carries
    the captured pass: run the copied teacher before calling the copied loss.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        if not layers:
            raise ValueError(f"model has no BatchNorm layers ({type(model).__name__})")
        for name, layer in layers:
            if layer.running_mean is None or layer.running_var is None:
                raise ValueError(
                    f"BatchNorm layer {name!r} has no running statistics "
                    f"(track_running_stats=False): there is no prior to match"
                )
        self.layer_names: tuple[str, ...] = tuple(n for n, _ in layers)
        self.layer_weights: tuple[float, ...] = tuple(
            _resolve_weights(list(self.layer_names), layer_weights)
        )
        self._capture = _Capture()
        self._removed = False
        # RemovableHandles hold the hook dicts weakly and are copied and pickled with them:
        # a copy of the loss made without its model gets dead handles (see attached).
        self._handles = [model.register_forward_pre_hook(_StartPass(self._capture))]
        for position, (_, layer) in enumerate(layers):
            hook = _LayerStatistics(self._capture, position)
            self._handles.append(layer.register_forward_hook(hook))

    @property
    def attached(self) -> bool:
        """Whether this loss's hooks are registered on a live model."""
        return (
            not self._removed
            and bool(self._handles)
            and all(handle.hooks_dict_ref() is not None for handle in self._handles)
        )

    def layer_losses(self) -> dict[str, Tensor]:
        """r_l (unweighted) of each BatchNorm layer that ran in the latest pass, by name."""
        return {self.layer_names[i]: r for i, r in sorted(self._capture.latest.items())}

    def forward(self) -> Tensor:
        """sum_l weight_l * r_l of the latest forward pass of the model."""
        if self._removed:
            raise RuntimeError(
                "BNStatisticsLoss is not attached to a model: its hooks were removed "
                "(detach(), remove() or the end of its with-block)"
            )
        # (the handles are opaque to torch.compile: checked in eager mode only)
        if not torch.compiler.is_compiling() and not self.attached:
            raise RuntimeError(
                "BNStatisticsLoss is not attached to a model: it is a copy (deepcopy or "
                "pickle) made without its teacher, whose hooks feed only the original loss; "
                "create BNStatisticsLoss(teacher) for the copy, or copy the teacher and the "
                "loss together"
            )
        latest = self._capture.latest
        if not latest:
            raise RuntimeError(
                "BNStatisticsLoss called before a forward pass of the model through its "
                f"BatchNorm layers {list(self.layer_names)}: run model(x) first"
            )
        terms = [self.layer_weights[i] * r for i, r in sorted(latest.items())]
        return sum(terms[1:], terms[0])

    def detach(self) -> None:
        """Remove every hook this loss registered (idempotent); later calls raise."""
        for handle in self._handles:
            handle.remove()  # a no-op for the dead handles of a copy
        self._handles = []
        self._capture.latest = {}
        self._removed = True

    def remove(self) -> None:
        """Alias of :meth:`detach`."""
        self.detach()

    def __enter__(self) -> BNStatisticsLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return f"layers={list(self.layer_names)}, layer_weights={list(self.layer_weights)}"
