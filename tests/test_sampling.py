"""SSD-KD sampling (semantics 5): PrioritizedReplayBuffer, priorities, the modulating function."""

from __future__ import annotations

import io
import math

import pytest
import torch

from kdfast.sampling import (
    PrioritizedReplayBuffer,
    diversity_difficulty_weights,
    ssd_kd_priorities,
)

F64 = torch.float64
PRIORITIES = [0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 0.01, 5.0]


def manual_probabilities(priorities, alpha, eps):
    q = [(abs(p) + eps) ** alpha for p in priorities]
    return [v / sum(q) for v in q]


def make_buffer(priorities=PRIORITIES, **kw) -> PrioritizedReplayBuffer:
    buf = PrioritizedReplayBuffer(capacity=len(priorities) + 2, **kw)
    ids = torch.arange(len(priorities), dtype=torch.float32)
    buf.add(torch.stack([ids, -ids], dim=1), priorities=priorities)
    return buf


def ids_of(buf: PrioritizedReplayBuffer) -> list[int]:
    return [int(v) for v in buf.samples[:, 0]]


# ---------------------------------------------------------------- probabilities and weights
@pytest.mark.parametrize("alpha, eps", [(0.6, 1e-6), (1.0, 0.0), (0.3, 0.5)])
def test_probabilities_match_definition(alpha, eps):
    buf = make_buffer(alpha=alpha, eps=eps)
    probs = buf.probabilities()
    expected = manual_probabilities(PRIORITIES, alpha, eps)
    assert probs.dtype == F64 and probs.shape == (len(PRIORITIES),)
    assert max(abs(a - b) for a, b in zip(probs.tolist(), expected, strict=True)) < 1e-15
    assert abs(float(probs.sum()) - 1.0) < 1e-14


def test_alpha_zero_is_uniform():
    probs = make_buffer(alpha=0.0, eps=0.0).probabilities()
    assert torch.equal(probs, torch.full_like(probs, 1 / len(PRIORITIES)))


def test_beta_zero_gives_unit_weights():
    for normalize in (True, False):
        buf = make_buffer(beta=0.0, normalize_weights=normalize)
        _, _, weights = buf.sample(64, generator=torch.Generator().manual_seed(0))
        assert torch.equal(weights, torch.ones(64))


@pytest.mark.parametrize("normalize", [True, False])
def test_weights_match_definition(normalize):
    alpha, beta, eps = 0.7, 0.5, 1e-3
    buf = make_buffer(alpha=alpha, beta=beta, eps=eps, normalize_weights=normalize)
    indices, samples, weights = buf.sample(200, generator=torch.Generator().manual_seed(1))
    probs = manual_probabilities(PRIORITIES, alpha, eps)
    n = len(PRIORITIES)
    scale = (n * min(probs)) ** -beta if normalize else 1.0
    expected = [(n * probs[i]) ** -beta / scale for i in indices.tolist()]
    assert max(abs(a - b) for a, b in zip(weights.tolist(), expected, strict=True)) < 1e-6
    assert torch.equal(samples[:, 0], indices.float())  # each sample is its slot's
    if normalize:
        assert bool((weights > 0).all()) and bool((weights <= 1).all())
        # The least likely reachable slot has weight exactly 1: draw it often enough.
        uniform = make_buffer(alpha=alpha, beta=beta, eps=eps)
        uniform.update_priorities([0], [0.0])
        _, _, w = uniform.sample(5000, generator=torch.Generator().manual_seed(2))
        assert float(w.max()) == 1.0


def test_max_normalised_weights_lie_in_unit_interval_with_unreachable_slot():
    # eps = 0 makes slot 0 unreachable (P = 0); weights still normalise by reachable slots.
    buf = make_buffer(eps=0.0, beta=1.0)
    indices, _, weights = buf.sample(4000, generator=torch.Generator().manual_seed(3))
    assert 0 not in indices.tolist()
    assert bool(torch.isfinite(weights).all()) and bool((weights > 0).all())
    assert bool((weights <= 1).all()) and float(weights.max()) == 1.0


def test_eps_keeps_zero_priority_samples_reachable():
    priorities = [0.0, 1.0, 1.0, 1.0]
    reachable = make_buffer(priorities, alpha=0.6, eps=1e-3)
    idx, _, _ = reachable.sample(20000, generator=torch.Generator().manual_seed(4))
    hits = int((idx == 0).sum())
    expected = 20000 * manual_probabilities(priorities, 0.6, 1e-3)[0]  # about 105
    assert 0 < hits and abs(hits - expected) < 5 * math.sqrt(expected)
    unreachable = make_buffer(priorities, alpha=0.6, eps=0.0)
    idx, _, _ = unreachable.sample(20000, generator=torch.Generator().manual_seed(4))
    assert int((idx == 0).sum()) == 0


def test_empirical_frequencies_match_probabilities():
    draws = 20000
    buf = make_buffer(alpha=0.6, eps=1e-2)
    indices, _, _ = buf.sample(draws, generator=torch.Generator().manual_seed(5))
    counts = torch.zeros(len(PRIORITIES), dtype=F64).index_add_(
        0, indices, torch.ones(draws, dtype=F64)
    )
    for p, count in zip(buf.probabilities().tolist(), counts.tolist(), strict=True):
        standard_error = math.sqrt(p * (1 - p) / draws)
        assert abs(count / draws - p) < 4 * standard_error + 1e-4


def test_sampling_is_reproducible_with_a_generator():
    buf = make_buffer()
    a = buf.sample(16, generator=torch.Generator().manual_seed(6))
    b = buf.sample(16, generator=torch.Generator().manual_seed(6))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- storage
def test_lazy_allocation_follows_the_first_batch():
    buf = PrioritizedReplayBuffer(capacity=4)
    assert len(buf) == 0 and buf.sample_shape is None and buf.samples is None
    batch = torch.randn(3, 2, 5, dtype=F64)
    slots = buf.add(batch)
    assert slots.tolist() == [0, 1, 2] and len(buf) == 3
    assert buf.sample_shape == (2, 5) and buf.samples.dtype == F64
    assert torch.equal(buf.samples, batch)
    _, samples, weights = buf.sample(2)
    assert samples.shape == (2, 2, 5) and weights.dtype == F64


def test_stored_samples_are_detached_copies():
    buf = PrioritizedReplayBuffer(capacity=4)
    x = torch.randn(2, 3, requires_grad=True)
    buf.add(x)
    assert not buf.samples.requires_grad
    with torch.no_grad():
        x.add_(1.0)
    assert not torch.equal(buf.samples, x.detach())


def test_fifo_overwrite_never_duplicates():
    buf = PrioritizedReplayBuffer(capacity=5)
    added = []
    for start in range(0, 12, 3):
        ids = torch.arange(start, start + 3, dtype=torch.float32)
        buf.add(torch.stack([ids, -ids], dim=1))
        added += ids.int().tolist()
        stored = ids_of(buf)
        assert len(stored) == len(set(stored)) == min(len(added), 5)
        assert set(stored) == set(added[-5:])
    buf.add(torch.tensor([[12.0, -12.0]]))
    assert set(ids_of(buf)) == {8, 9, 10, 11, 12}  # 7, the oldest, went first


def test_adding_more_than_capacity_keeps_the_newest_like_single_adds():
    ids = torch.arange(13, dtype=torch.float32)  # 11 added at once: not a multiple of 5
    batch = torch.stack([ids, -ids], dim=1)
    at_once, one_by_one = PrioritizedReplayBuffer(5), PrioritizedReplayBuffer(5)
    at_once.add(batch[:2])
    one_by_one.add(batch[:2])
    slots = at_once.add(batch[2:], priorities=ids[2:].double() / 10)
    for i in range(2, 13):
        one_by_one.add(batch[i : i + 1], priorities=[float(ids[i]) / 10])
    assert sorted(slots.tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(at_once.samples, one_by_one.samples)
    assert torch.equal(at_once.priorities, one_by_one.priorities)
    assert set(ids_of(at_once)) == {8, 9, 10, 11, 12}
    at_once.add(batch[:1] + 100)
    assert set(ids_of(at_once)) == {9, 10, 11, 12, 100}  # 8, the oldest, went first


def test_new_samples_enter_at_max_priority():
    buf = PrioritizedReplayBuffer(capacity=4)
    buf.add(torch.randn(3, 2))
    assert buf.priorities.tolist() == [1.0, 1.0, 1.0]  # empty buffer: 1.0
    buf.update_priorities(torch.tensor([0, 1, 2]), torch.tensor([0.5, 2.5, 0.1], dtype=F64))
    buf.add(torch.randn(2, 2))  # fills slot 3, then overwrites slot 0 (the oldest)
    assert buf.priorities.tolist() == [2.5, 2.5, 0.1, 2.5]
    buf.add(torch.randn(1, 2), priorities=[0.25])
    assert buf.priorities.tolist() == [2.5, 0.25, 0.1, 2.5]


def test_update_priorities_changes_sampling():
    buf = make_buffer([1.0, 1.0, 1.0], alpha=1.0, eps=0.0)
    buf.update_priorities([2], [0.0])
    idx, _, _ = buf.sample(500, generator=torch.Generator().manual_seed(7))
    assert 2 not in idx.tolist()
    assert buf.probabilities().tolist() == [0.5, 0.5, 0.0]


def test_beta_is_settable():
    buf = make_buffer(beta=0.4)
    buf.beta = 1.0
    assert buf.beta == 1.0
    buf.set_beta(0.0)
    _, _, w = buf.sample(8)
    assert torch.equal(w, torch.ones(8))
    with pytest.raises(ValueError, match="beta"):
        buf.beta = -0.1


# ---------------------------------------------------------------- checkpointing
def roundtrip(state: dict) -> dict:
    stream = io.BytesIO()
    torch.save(state, stream)
    stream.seek(0)
    return torch.load(stream)


def test_state_dict_round_trip_resumes_identical_sampling():
    buf = PrioritizedReplayBuffer(capacity=6, alpha=0.8, beta=0.3, eps=1e-4)
    torch.manual_seed(0)
    buf.add(torch.randn(4, 3))
    indices, _, _ = buf.sample(5, generator=torch.Generator().manual_seed(8))
    buf.update_priorities(indices, torch.rand(5, dtype=F64))
    buf.add(torch.randn(4, 3))  # wraps around: the next slot is no longer len(buf)
    buf.beta = 0.7
    restored = PrioritizedReplayBuffer(capacity=6)
    restored.load_state_dict(roundtrip(buf.state_dict()))
    assert (restored.alpha, restored.beta, restored.eps) == (0.8, 0.7, 1e-4)
    gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(3):
        a, b = buf.sample(7, generator=gen_a), restored.sample(7, generator=gen_b)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    new = torch.randn(1, 3)
    assert torch.equal(buf.add(new), restored.add(new))
    assert torch.equal(buf.samples, restored.samples)
    assert torch.equal(buf.priorities, restored.priorities)


def test_state_dict_is_a_copy_and_empty_buffers_round_trip():
    buf = make_buffer()
    state = buf.state_dict()
    buf.update_priorities([0], [9.0])
    buf.add(torch.zeros(1, 2))
    assert state["priorities"][0] == 0.0 and state["samples"].shape[0] == len(PRIORITIES)
    empty = PrioritizedReplayBuffer(capacity=3)
    other = make_buffer([1.0])  # capacity 3 as well, one sample stored
    other.load_state_dict(roundtrip(empty.state_dict()))
    assert len(other) == 0 and other.samples is None


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": -3}, "capacity"),
        ({"capacity": 2.5}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": 4, "alpha": -1.0}, "alpha"),
        ({"capacity": 4, "beta": float("nan")}, "beta"),
        ({"capacity": 4, "eps": -1e-6}, "eps"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrioritizedReplayBuffer(**kwargs)


def test_bad_buffer_calls():
    buf = PrioritizedReplayBuffer(capacity=4)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(2)
    with pytest.raises(ValueError, match="empty"):
        buf.probabilities()
    with pytest.raises(ValueError, match="empty"):
        buf.update_priorities([0], [1.0])
    with pytest.raises(TypeError, match="samples must be a torch.Tensor"):
        buf.add([[1.0, 2.0]])
    with pytest.raises(ValueError, match="batch dim"):
        buf.add(torch.tensor(1.0))
    with pytest.raises(ValueError, match="finite and >= 0"):
        buf.add(torch.randn(1, 5), priorities=[-1.0])
    assert buf.sample_shape is None  # a rejected first batch fixes nothing
    buf.add(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"shape \(n, \*\(3,\)\).*\(2, 4\)"):
        buf.add(torch.randn(2, 4))
    with pytest.raises(TypeError, match="float64"):
        buf.add(torch.randn(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="batch_size"):
        buf.sample(0)
    with pytest.raises(ValueError, match=r"priorities must have shape \(2,\), got \(3,\)"):
        buf.add(torch.randn(2, 3), priorities=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        buf.add(torch.randn(1, 3), priorities=[-1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        buf.update_priorities([0, 1], [1.0, float("nan")])
    with pytest.raises(ValueError, match="finite and >= 0"):
        buf.update_priorities([0], [float("inf")])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        buf.update_priorities([2], [1.0])  # slot 2 exists in storage but is not filled
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        buf.update_priorities(torch.tensor([-1]), [1.0])
    with pytest.raises(ValueError, match=r"priorities must have shape \(2,\)"):
        buf.update_priorities([0, 1], [1.0])
    with pytest.raises(TypeError, match="integer"):
        buf.update_priorities(torch.tensor([0.0]), [1.0])
    with pytest.raises(ValueError, match="1-D"):
        buf.update_priorities(torch.tensor([[0]]), [1.0])
    assert len(buf) == 2  # failed calls changed nothing
    assert buf.priorities.tolist() == [1.0, 1.0]


def test_all_zero_priorities_without_eps_raise():
    buf = make_buffer([0.0, 0.0], eps=0.0)
    with pytest.raises(ValueError, match="every priority is 0"):
        buf.sample(1)


def test_bad_state_dicts():
    buf = make_buffer()
    state = buf.state_dict()
    with pytest.raises(ValueError, match="capacity"):
        PrioritizedReplayBuffer(capacity=3).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        PrioritizedReplayBuffer(capacity=buf.capacity).load_state_dict({"capacity": buf.capacity})
    state["priorities"] = state["priorities"][:2]
    with pytest.raises(ValueError, match="inconsistent"):
        PrioritizedReplayBuffer(capacity=buf.capacity).load_state_dict(state)


# ---------------------------------------------------------------- priorities and phi
def test_ssd_kd_priorities():
    kl = torch.tensor([0.5, -1e-17, 2.0], requires_grad=True)
    assert ssd_kd_priorities(kl).tolist() == pytest.approx([0.5, 1e-17, 2.0], rel=1e-6)
    weights = torch.tensor([1.0, 0.5, 0.25], dtype=F64)
    delta = ssd_kd_priorities(kl, weights)
    assert delta.dtype == F64 and not delta.requires_grad
    assert delta.tolist() == pytest.approx([0.5, 0.5e-17, 0.5], rel=1e-6)
    with pytest.raises(ValueError, match=r"previous_weights must match.*\(2,\)"):
        ssd_kd_priorities(kl, weights[:2])
    with pytest.raises(ValueError, match="1-D"):
        ssd_kd_priorities(kl.detach()[None])
    with pytest.raises(TypeError, match="kl_per_sample"):
        ssd_kd_priorities(torch.tensor([1, 2]))


def test_priorities_feed_the_buffer():
    buf = make_buffer()
    indices, _, weights = buf.sample(4, generator=torch.Generator().manual_seed(10))
    kl = torch.tensor([0.2, 0.4, 0.6, 0.8])
    buf.update_priorities(indices, ssd_kd_priorities(kl, weights))
    expected = dict(zip(indices.tolist(), (kl * weights).tolist(), strict=True))
    stored = buf.priorities.tolist()
    for slot, value in expected.items():
        assert stored[slot] == pytest.approx(value, rel=1e-6)


def manual_phi(logits, gamma, temperature):
    rows = [[v / temperature for v in row] for row in logits]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in rows]
    predicted = [row.index(max(row)) for row in probs]
    return [(1.0 - probs[i][c]) ** gamma / predicted.count(c) for i, c in enumerate(predicted)]


@pytest.mark.parametrize("gamma, temperature", [(1.0, 1.0), (2.0, 3.0), (0.0, 1.0)])
def test_diversity_difficulty_weights_match_definition(gamma, temperature):
    logits = [[2.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0], [4, 1, 2]]
    z = torch.tensor(logits, dtype=F64, requires_grad=True)
    phi = diversity_difficulty_weights(z, gamma=gamma, temperature=temperature)
    assert phi.shape == (5,) and phi.dtype == F64 and not phi.requires_grad
    expected = manual_phi(logits, gamma, temperature)
    assert max(abs(a - b) for a, b in zip(phi.tolist(), expected, strict=True)) < 1e-14
    if gamma == 0.0:  # the diversity factors of a class sum to 1: 3 classes predicted
        assert abs(float(phi.sum()) - 3.0) < 1e-14


def test_diversity_weights_ties_dtype_and_tracing():
    phi = diversity_difficulty_weights(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    assert phi.dtype == torch.float32
    # Both rows predict their lowest maximal index (0 and 1): distinct classes, count 1.
    expected = [1 - math.e / (2 * math.e + 1)] * 2
    assert phi.tolist() == pytest.approx(expected, rel=1e-6)
    half = diversity_difficulty_weights(torch.randn(6, 4).to(torch.bfloat16))
    assert half.dtype == torch.float32
    compiled = torch.compile(diversity_difficulty_weights, fullgraph=True, backend="eager")
    z = torch.randn(8, 3, dtype=F64)
    assert torch.allclose(compiled(z, gamma=2.0), diversity_difficulty_weights(z, gamma=2.0))


def test_diversity_weights_bad_inputs():
    with pytest.raises(ValueError, match=r"\(B, C\).*\(4,\)"):
        diversity_difficulty_weights(torch.randn(4))
    with pytest.raises(ValueError, match=r"\(B, C\).*\(0, 3\)"):
        diversity_difficulty_weights(torch.randn(0, 3))
    with pytest.raises(TypeError, match="teacher_logits"):
        diversity_difficulty_weights(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="gamma"):
        diversity_difficulty_weights(torch.randn(2, 3), gamma=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        diversity_difficulty_weights(torch.randn(2, 3), temperature=0.0)
