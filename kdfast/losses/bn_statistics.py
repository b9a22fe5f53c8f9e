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

import math
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
    hook reads them). The loss keeps references to the layers, not their parameters: it has
    no parameters or buffers of its own.

    Args:
        model: the network whose BatchNorm running statistics are the prior (the teacher).
        layer_weights: None (every weight 1), a sequence with one weight per BatchNorm layer
            in module order (``named_modules``), or a dict layer name -> weight (unnamed
            layers keep 1). DeepInversion's ImageNet code weights the first layer by 10.

    ``remove()`` removes the hooks; the loss is also a context manager that removes them on
    exit.
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
        self._latest: dict[int, Tensor] = {}  # layer position -> r of the latest pass
        self._removed = False
        self._handles = [model.register_forward_pre_hook(self._start_pass)]
        for position, (_, layer) in enumerate(layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(position)))

    def _start_pass(self, module: nn.Module, args: tuple) -> None:
        self._latest = {}

    def _make_hook(self, position: int):
        def hook(layer: _BatchNorm, args: tuple, output: Tensor) -> None:
            self._latest[position] = bn_statistics_distance(
                args[0], layer.running_mean.detach(), layer.running_var.detach()
            )

        return hook

    def layer_losses(self) -> dict[str, Tensor]:
        """r_l (unweighted) of each BatchNorm layer that ran in the latest pass, by name."""
        return {self.layer_names[i]: r for i, r in sorted(self._latest.items())}

    def forward(self) -> Tensor:
        """sum_l weight_l * r_l of the latest forward pass of the model."""
        if self._removed:
            raise RuntimeError("BNStatisticsLoss: the hooks were removed (remove() or with-exit)")
        if not self._latest:
            raise RuntimeError(
                "BNStatisticsLoss called before a forward pass of the model through its "
                f"BatchNorm layers {list(self.layer_names)}: run model(x) first"
            )
        terms = [self.layer_weights[i] * r for i, r in sorted(self._latest.items())]
        return sum(terms[1:], terms[0])

    def remove(self) -> None:
        """Remove every hook this loss registered; later calls raise."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._latest = {}
        self._removed = True

    def __enter__(self) -> BNStatisticsLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return f"layers={list(self.layer_names)}, layer_weights={list(self.layer_weights)}"
