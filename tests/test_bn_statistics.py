"""BNStatisticsLoss: the DeepInversion BatchNorm-statistics prior (semantics 5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdfast.losses.bn_statistics import BNStatisticsLoss, bn_statistics_distance

F64 = torch.float64


def manual_r(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> float:
    """r from the definition, channel by channel, in float64 Python arithmetic."""
    x = x.detach().to(F64).transpose(0, 1).reshape(x.shape[1], -1)
    mean_sq, var_sq = 0.0, 0.0
    for c in range(x.shape[0]):
        values = x[c].tolist()
        mu = sum(values) / len(values)
        var = sum((v - mu) ** 2 for v in values) / len(values)
        mean_sq += (float(running_mean[c]) - mu) ** 2
        var_sq += (float(running_var[c]) - var) ** 2
    return math.sqrt(var_sq) + math.sqrt(mean_sq)


def randomize_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def test_spec_worked_example():
    bn = nn.BatchNorm2d(2).double().eval()  # running_mean 0, running_var 1
    x = torch.tensor([[[[1, 2]], [[0, 0]]], [[[3, 4]], [[1, -1]]]], dtype=F64)
    with BNStatisticsLoss(bn) as loss:
        bn(x)
        r = loss()
    assert abs(float(r) - 3.0590169943749475) < 1e-12
    assert r.dtype == F64 and r.dim() == 0


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.BatchNorm1d(3), (5, 3)),
        (nn.BatchNorm1d(3), (4, 3, 6)),
        (nn.BatchNorm2d(3), (2, 3, 4, 5)),
        (nn.BatchNorm3d(3), (2, 3, 2, 3, 4)),
        (nn.SyncBatchNorm(3), (2, 3, 4)),
    ],
)
def test_every_batchnorm_kind_matches_definition(layer, shape):
    layer = randomize_stats(layer.double())
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    loss = BNStatisticsLoss(layer)
    layer(x)
    expected = manual_r(x, layer.running_mean, layer.running_var)
    assert abs(float(loss()) - expected) <= 1e-12 * expected
    loss.remove()


def small_model(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    )
    return randomize_stats(model.to(dtype).requires_grad_(False))  # a frozen teacher


def expected_model_loss(model: nn.Sequential, x: torch.Tensor, weights=(1.0, 1.0)) -> float:
    h1 = model[0](x)
    h2 = model[4](model[3](model[2](model[1](h1))))
    return weights[0] * manual_r(h1, model[1].running_mean, model[1].running_var) + weights[
        1
    ] * manual_r(h2, model[5].running_mean, model[5].running_var)


def test_layer_names_and_default_weights():
    model = small_model(F64)
    loss = BNStatisticsLoss(model)
    assert loss.layer_names == ("1", "5")
    assert loss.layer_weights == (1.0, 1.0)
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    model(x)
    value = float(loss().detach())
    assert abs(value - expected_model_loss(model, x)) < 1e-12 * value
    assert set(loss.layer_losses()) == {"1", "5"}


@pytest.mark.parametrize("weights", [[10.0, 0.5], {"1": 10.0, "5": 0.5}])
def test_layer_weights(weights):
    model = small_model(F64)
    loss = BNStatisticsLoss(model, layer_weights=weights)
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    model(x)
    expected = expected_model_loss(model, x, (10.0, 0.5))
    assert abs(float(loss()) - expected) < 1e-12 * expected


def test_dict_weights_default_to_one():
    model = small_model(F64)
    loss = BNStatisticsLoss(model, layer_weights={"1": 10.0})
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    model(x)
    expected = expected_model_loss(model, x, (10.0, 1.0))
    assert abs(float(loss()) - expected) < 1e-12 * expected


def test_latest_pass_only():
    model = small_model(F64)
    loss = BNStatisticsLoss(model)
    x1 = torch.randn(3, 2, 4, 4, dtype=F64)
    x2 = torch.randn(4, 2, 4, 4, dtype=F64) * 3
    model(x1)
    first = float(loss())
    model(x2)
    second = float(loss())
    assert abs(second - expected_model_loss(model, x2)) < 1e-12 * second
    assert abs(second - first) > 1e-3


def test_skipped_layer_is_not_stale():
    model = small_model(F64)
    loss = BNStatisticsLoss(model)
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    model(x)

    # A pass of the root model that stops before the second BatchNorm (exception inside).
    def stop(module, args):
        raise KeyError("stop")

    model[4].register_forward_pre_hook(stop)
    with pytest.raises(KeyError):
        model(x * 2)
    assert set(loss.layer_losses()) == {"1"}
    assert (
        abs(float(loss()) - manual_r(model[0](x * 2), model[1].running_mean, model[1].running_var))
        < 1e-10
    )


def test_gradcheck_wrt_input():
    model = small_model(F64)
    loss = BNStatisticsLoss(model, layer_weights=[2.0, 0.7])

    def f(x):
        model(x)
        return loss()

    x = torch.randn(3, 2, 4, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,))
    loss.remove()


def test_half_activations_computed_in_float32():
    layer = randomize_stats(nn.BatchNorm2d(3))
    x = (torch.randn(4, 3, 5, 5) * 4 + 2).to(torch.bfloat16)
    with BNStatisticsLoss(layer) as loss:
        layer(x)
        r = loss()
    assert r.dtype == torch.float32
    expected = manual_r(x, layer.running_mean, layer.running_var)
    assert abs(float(r) - expected) <= 1e-5 * expected


def test_distance_traces_without_graph_breaks():
    fn = torch.compile(bn_statistics_distance, fullgraph=True, backend="eager")
    x = torch.randn(4, 3, 5, dtype=F64)
    rm, rv = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64)
    assert abs(float(fn(x, rm, rv)) - manual_r(x, rm, rv)) < 1e-12 * manual_r(x, rm, rv)


def test_remove_and_context_manager():
    model = small_model()
    x = torch.randn(3, 2, 4, 4)
    with BNStatisticsLoss(model) as loss:
        model(x)
        loss()
    assert not model._forward_pre_hooks and not model[1]._forward_hooks
    assert not model[5]._forward_hooks
    model(x)
    with pytest.raises(RuntimeError, match="removed"):
        loss()


def test_bad_inputs():
    with pytest.raises(ValueError, match="no BatchNorm"):
        BNStatisticsLoss(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        BNStatisticsLoss(torch.zeros(2))
    with pytest.raises(ValueError, match="running statistics"):
        BNStatisticsLoss(nn.BatchNorm1d(2, track_running_stats=False))
    model = small_model()
    with pytest.raises(ValueError, match="one weight per BatchNorm layer"):
        BNStatisticsLoss(model, layer_weights=[1.0])
    with pytest.raises(ValueError, match=r"\['2'\] are not BatchNorm layers"):
        BNStatisticsLoss(model, layer_weights={"2": 1.0})
    with pytest.raises(ValueError, match="finite"):
        BNStatisticsLoss(model, layer_weights=[1.0, float("nan")])
    with pytest.raises(TypeError, match="layer_weights"):
        BNStatisticsLoss(model, layer_weights=3.0)
    loss = BNStatisticsLoss(model)
    with pytest.raises(RuntimeError, match="before a forward pass"):
        loss()
