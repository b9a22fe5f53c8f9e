"""State at the edges: restoring, updating and copying stateful kdfast objects.

PrioritizedReplayBuffer.load_state_dict / update_priorities reject what would corrupt the
buffer (with errors naming the field and the values), and BNStatisticsLoss survives
pickling and copying of its teacher and of itself.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from kdfast.losses.bn_statistics import BNStatisticsLoss
from kdfast.sampling import PrioritizedReplayBuffer

F64 = torch.float64


# ---------------------------------------------------------------- replay buffer: restoring
def partial_buffer() -> PrioritizedReplayBuffer:
    """Capacity 5, three samples (slots 0..2), next slot 3."""
    buf = PrioritizedReplayBuffer(capacity=5, eps=0.0)
    buf.add(torch.arange(6, dtype=torch.float32).reshape(3, 2), priorities=[1.0, 2.0, 3.0])
    return buf


def full_buffer() -> PrioritizedReplayBuffer:
    """Capacity 4, wrapped around once: full, next slot 2."""
    buf = PrioritizedReplayBuffer(capacity=4)
    buf.add(torch.randn(6, 3))
    return buf


def load(buf: PrioritizedReplayBuffer, **changes) -> None:
    state = buf.state_dict()
    state.update(changes)
    PrioritizedReplayBuffer(capacity=buf.capacity).load_state_dict(state)


def test_wrapped_state_round_trips():
    buf = full_buffer()
    assert buf.state_dict()["next_index"] == 2 and len(buf) == 4
    restored = PrioritizedReplayBuffer(capacity=4)
    restored.load_state_dict(buf.state_dict())
    new = torch.randn(1, 3)
    assert torch.equal(restored.add(new), buf.add(new))


@pytest.mark.parametrize(
    "next_index, match",
    [
        (4, r"next_index must be 3 .*3 of 5 slots filled.*got 4"),  # a never-written slot
        (1, r"next_index must be 3 .*got 1"),  # would overwrite a newer sample first
        (7, r"next_index must be 3 .*got 7"),
        (-1, r"next_index must be .*got -1"),
    ],
)
def test_next_index_must_follow_the_filled_slots(next_index, match):
    with pytest.raises(ValueError, match=match):
        load(partial_buffer(), next_index=next_index)


@pytest.mark.parametrize("next_index", [-1, 4, 9])
def test_next_index_of_a_full_buffer_must_be_a_slot(next_index):
    with pytest.raises(ValueError, match=rf"next_index must lie in \[0, 4\).*got {next_index}"):
        load(full_buffer(), next_index=next_index)


@pytest.mark.parametrize("next_index", [True, 2.0, "2", None])
def test_next_index_must_be_an_int(next_index):
    with pytest.raises(TypeError, match="next_index must be an int"):
        load(full_buffer(), next_index=next_index)


@pytest.mark.parametrize(
    "bad, match",
    [
        (float("nan"), "nan at position 1"),
        (float("inf"), "inf at position 1"),
        (-0.5, r"-0\.5 at position 1"),
    ],
)
def test_restored_priorities_must_be_finite_and_non_negative(bad, match):
    buf = partial_buffer()
    priorities = buf.state_dict()["priorities"]
    priorities[1] = bad
    with pytest.raises(ValueError, match=rf"priorities must be finite and >= 0.*{match}"):
        load(buf, priorities=priorities)


def test_restored_priorities_and_samples_types_and_shapes():
    buf = partial_buffer()
    state = buf.state_dict()
    with pytest.raises(TypeError, match=r"state_dict priorities must be a real floating.*int64"):
        load(buf, priorities=state["priorities"].long())
    with pytest.raises(TypeError, match=r"priorities must be a real floating.*complex128"):
        load(buf, priorities=state["priorities"].to(torch.complex128))
    with pytest.raises(TypeError, match="state_dict priorities must be a torch.Tensor"):
        load(buf, priorities=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="state_dict samples must be a torch.Tensor"):
        load(buf, samples=state["samples"].tolist())
    with pytest.raises(ValueError, match=r"priorities must have shape \(3,\).*\(3, 1\)"):
        load(buf, priorities=state["priorities"][:, None])
    with pytest.raises(ValueError, match=r"samples must have a batch dim"):
        load(buf, samples=torch.tensor(1.0), priorities=state["priorities"][:0])
    with pytest.raises(ValueError, match=r"6 samples .* capacity 5"):
        load(buf, samples=torch.zeros(6, 2), priorities=torch.ones(6, dtype=F64), next_index=0)


def test_rejected_state_leaves_the_buffer_unchanged():
    buf = partial_buffer()
    target = full_buffer()
    bad = buf.state_dict()
    bad["capacity"] = 4
    bad["next_index"] = 9
    before = (target.samples.clone(), target.priorities, target.state_dict()["next_index"])
    with pytest.raises(ValueError):
        target.load_state_dict(bad)
    assert torch.equal(target.samples, before[0]) and torch.equal(target.priorities, before[1])
    assert target.state_dict()["next_index"] == before[2]


def test_a_valid_partial_state_still_loads_and_samples():
    buf = partial_buffer()
    restored = PrioritizedReplayBuffer(capacity=5)
    restored.load_state_dict(buf.state_dict())
    assert restored.priorities.tolist() == [1.0, 2.0, 3.0]
    idx, _, _ = restored.sample(50, generator=torch.Generator().manual_seed(0))
    assert int(idx.max()) < 3  # never an unwritten slot
    assert restored.add(torch.zeros(1, 2)).tolist() == [3]


# ---------------------------------------------------------------- replay buffer: updating
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
def test_mask_dtypes_are_not_indices(dtype):
    buf = partial_buffer()
    with pytest.raises(TypeError, match=rf"indices must be integer slot numbers.*{dtype}.*mask"):
        buf.update_priorities(torch.tensor([1, 0, 1], dtype=dtype), [9.0, 9.0, 9.0])
    with pytest.raises(TypeError, match=rf"indices must be integer slot numbers.*{dtype}"):
        buf.update_priorities(torch.tensor([1], dtype=dtype), [9.0])  # a short "mask"
    assert buf.priorities.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_every_signed_integer_dtype_indexes_slots(dtype):
    buf = partial_buffer()
    buf.update_priorities(torch.tensor([2, 0], dtype=dtype), [7.0, 5.0])
    assert buf.priorities.tolist() == [5.0, 2.0, 7.0]


def test_integer_like_sequences_index_slots():
    np = pytest.importorskip("numpy")
    buf = partial_buffer()
    buf.update_priorities([np.int64(1)], [4.0])
    buf.update_priorities(np.array([0], dtype=np.int32), np.array([6.0]))
    assert buf.priorities.tolist() == [6.0, 4.0, 3.0]
    with pytest.raises(TypeError, match="indices must be integers"):
        buf.update_priorities([True], [1.0])
    with pytest.raises(TypeError, match="indices must be integers"):
        buf.update_priorities([1.0], [1.0])


@pytest.mark.parametrize(
    "priorities, match",
    [
        (torch.tensor([1 + 2j]), "complex"),
        ([1 + 2j], "complex"),
        (torch.tensor([True]), "bool"),
        ([True], "bool"),
        (["high"], "high"),
        ("1", "'1'"),
        ([None], "None"),
    ],
)
def test_priorities_must_be_real_numbers(priorities, match):
    buf = partial_buffer()
    with pytest.raises(TypeError, match=rf"priorities must be real numbers.*{match}"):
        buf.update_priorities([0], priorities)
    with pytest.raises(TypeError, match=rf"priorities must be real numbers.*{match}"):
        buf.add(torch.zeros(1, 2), priorities=priorities)
    assert buf.priorities.tolist() == [1.0, 2.0, 3.0] and len(buf) == 3


def test_priorities_keep_float64_precision_from_python_floats():
    buf = partial_buffer()
    buf.update_priorities([0], [0.1])
    assert buf.priorities[0].item() == 0.1


# ---------------------------------------------------------------- BNStatisticsLoss: copies
def teacher() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.BatchNorm1d(4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.to(F64).eval().requires_grad_(False)


def inputs(seed: int) -> torch.Tensor:
    return torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))


def saved(obj):
    stream = io.BytesIO()
    torch.save(obj, stream)
    stream.seek(0)
    return torch.load(stream, weights_only=False)


def test_an_attached_teacher_can_be_saved_and_pickled():
    model = teacher()
    loss = BNStatisticsLoss(model)
    x = inputs(1).requires_grad_()
    model(x)
    before = loss().item()
    loaded = saved(model)
    unpickled = pickle.loads(pickle.dumps(model))
    for copied in (loaded, unpickled):
        assert torch.allclose(copied(inputs(2)), model(inputs(2)))
    model(x)
    loaded(inputs(3))  # a loaded teacher's inert hooks feed no loss
    assert float(loss()) == before


def test_a_deep_copied_teacher_does_not_write_into_the_loss():
    model = teacher()
    loss = BNStatisticsLoss(model)
    model(inputs(1))
    before = float(loss())
    twin = copy.deepcopy(model)
    twin(inputs(2) * 5)
    assert float(loss()) == before
    model(inputs(2) * 5)
    assert float(loss()) != before


def test_a_copied_loss_is_detached_and_says_so():
    model = teacher()
    loss = BNStatisticsLoss(model)
    model(inputs(1))
    for copied in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss)), saved(loss)):
        assert copied.layer_names == loss.layer_names
        with pytest.raises(RuntimeError, match="not attached to a model"):
            copied()
        copied.detach()  # harmless: the original's hooks stay
    fresh = BNStatisticsLoss(model)
    model(inputs(2))
    assert float(loss()) == float(fresh())  # the original still follows its teacher


@pytest.mark.parametrize("loss_first", [False, True])
def test_a_teacher_copied_with_its_loss_stays_paired(loss_first):
    model = teacher()
    pair = {"teacher": model, "loss": BNStatisticsLoss(model, layer_weights=[2.0, 0.5])}
    if loss_first:  # the copy meets the loss's hook handles before the teacher
        pair = {"loss": pair["loss"], "teacher": model}
    pair["teacher"](inputs(1))
    want = float(pair["loss"]())
    for twin in (copy.deepcopy(pair), saved(pair), pickle.loads(pickle.dumps(pair))):
        with pytest.raises(RuntimeError, match="before a forward pass"):
            twin["loss"]()  # a copy starts with no captured pass
        twin["teacher"](inputs(1))
        assert abs(float(twin["loss"]()) - want) < 1e-12 * want
        twin["teacher"](inputs(4))
        assert float(pair["loss"]()) == want  # the original pair is untouched
        assert twin["loss"].attached and pair["loss"].attached


def test_detach_removes_the_hooks():
    model = teacher()
    loss = BNStatisticsLoss(model)
    model(inputs(1))
    loss.detach()
    assert not model._forward_pre_hooks and not model[1]._forward_hooks
    assert not model[3]._forward_hooks
    with pytest.raises(RuntimeError, match=r"not attached to a model.*detach\(\)"):
        loss()
    loss.detach()  # idempotent
