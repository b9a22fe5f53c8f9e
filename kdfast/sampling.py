"""SSD-KD sampling: a prioritized replay buffer and the diversity-aware modulating function.

Reference: Liu et al., "Small Scale Data-Free Knowledge Distillation", CVPR 2024 (SSD-KD).
No official code exists; the forms below are docs/semantics.md section 5.

Fixed by the paper (implemented as stated):

* priority of a synthetic sample x at round i: delta_i(x) = w_{i-1}(x) * KL(f_t(x) || f_s(x)),
  w_{-1} = 1 (:func:`ssd_kd_priorities`);
* sampling with replacement with P(x) = (|delta(x)| + eps)^alpha / sum_x' (|delta(x')| + eps)^alpha;
* importance weights w(x) = (N P(x))^(-beta), N = the buffer's fill, normalised by the largest
  weight over the buffer (N P_min)^(-beta) (the prioritized-replay convention of Schaul et al.,
  ICLR 2016);
* a fixed-capacity FIFO buffer in which new samples enter with the current maximum priority.

[unverified] knobs, exposed because the paper does not pin them down: ``alpha`` (0.6),
``beta`` (0.4, and any schedule toward 1), ``eps`` (1e-6), ``normalize_weights`` (True), and
the exact form of the modulating function phi (:func:`diversity_difficulty_weights`:
1 / count of the teacher-predicted class in the batch times (1 - p_t(class | x))^gamma).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdfast._validation import check_positive, check_tensor, compute_dtype, is_real

__all__ = ["PrioritizedReplayBuffer", "ssd_kd_priorities", "diversity_difficulty_weights"]

_STATE_KEYS = (
    "capacity",
    "alpha",
    "beta",
    "eps",
    "normalize_weights",
    "samples",
    "priorities",
    "next_index",
)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_index(name: str, value: object) -> int:
    """An int (or an integer-like number such as numpy's), not a bool."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _real_priorities(name: str, values: Any) -> Tensor:
    """``values`` as a float64 tensor: real numbers only (no complex, bool or strings)."""
    if isinstance(values, Tensor):
        p = values.detach()
    else:
        if isinstance(values, (str, bytes)):
            raise TypeError(f"{name} must be real numbers, got {values!r}")
        try:
            p = torch.as_tensor(values)  # to learn the dtype: complex and bool are refused
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be real numbers, got {values!r} ({exc})") from None
        if p.is_floating_point():  # Python floats: convert from the values, not via float32
            p = torch.as_tensor(values, dtype=torch.float64)
    if p.dtype.is_complex or p.dtype == torch.bool:
        raise TypeError(
            f"{name} must be real numbers, got a {p.dtype} tensor of shape {tuple(p.shape)}"
        )
    if not (p.is_floating_point() or _is_integer(p.dtype)):
        raise TypeError(f"{name} must be real numbers, got a {p.dtype} tensor")
    return p.to(torch.float64)


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_priority_values(name: str, p: Tensor) -> None:
    bad = ~torch.isfinite(p) | (p < 0)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} must be finite and >= 0, got {p[first].item()} at position {first} "
            f"(shape {tuple(p.shape)})"
        )


def _check_nonnegative(name: str, value: object) -> float:
    if not is_real(value) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


class PrioritizedReplayBuffer:
    """Fixed-capacity FIFO buffer of samples drawn with probability rising with their priority.

    Args:
        capacity: maximum number of stored samples (> 0).
        alpha: priority exponent (>= 0); 0 gives uniform sampling. Default 0.6.
        beta: importance-weight exponent (>= 0); 0 gives weights 1. Default 0.4. Settable: a
            schedule toward 1 is the caller's, e.g. ``buf.beta = 0.4 + 0.6 * step / steps``.
        eps: added to every |priority| (>= 0) so that zero-priority samples stay reachable.
        normalize_weights: divide weights by the largest weight over the whole buffer,
            (N P_min)^(-beta), so that they lie in (0, 1]. Default True.

    Storage holds tensors of one per-sample shape, allocated on the first :meth:`add` with
    that batch's device and dtype (samples are stored detached). Slots ``0 .. len - 1`` are
    filled; once full, each new sample overwrites the oldest one. Priorities are kept in
    float64 on the samples' device. Sampling uses ``torch.multinomial``, which limits the
    capacity to 2^24 slots.

    Indices returned by :meth:`sample` name storage slots: a slot overwritten by a later
    :meth:`add` holds a different sample, so update priorities before adding more.
    """

    def __init__(
        self,
        capacity: int,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-6,
        normalize_weights: bool = True,
    ) -> None:
        self.capacity = _check_count("capacity", capacity)
        self.alpha = _check_nonnegative("alpha", alpha)
        self.beta = beta
        self.eps = _check_nonnegative("eps", eps)
        self.normalize_weights = bool(normalize_weights)
        self._samples: Tensor | None = None
        self._priorities: Tensor | None = None
        self._size = 0
        self._next = 0  # slot the next added sample goes to (the oldest one once full)

    # ------------------------------------------------------------------ properties
    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _check_nonnegative("beta", value)

    def set_beta(self, value: float) -> None:
        """Set the importance-weight exponent (for a schedule toward 1)."""
        self.beta = value

    def __len__(self) -> int:
        return self._size

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape, or None before the first :meth:`add`."""
        return None if self._samples is None else tuple(self._samples.shape[1:])

    @property
    def samples(self) -> Tensor | None:
        """The stored samples (len, *sample_shape), slot order (a view: do not modify)."""
        return None if self._samples is None else self._samples[: self._size]

    @property
    def priorities(self) -> Tensor | None:
        """A copy of the stored priorities |delta| (len,), float64, slot order."""
        return None if self._priorities is None else self._priorities[: self._size].clone()

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _as_priorities(name: str, values: Any, n: int, device: torch.device) -> Tensor:
        p = _real_priorities(name, values)
        if p.dim() != 1 or p.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},), got {tuple(p.shape)}")
        _check_priority_values(name, p)
        return p.to(device)

    def add(self, samples: Tensor, priorities: Tensor | Sequence[float] | None = None) -> Tensor:
        """Store a batch ``samples`` (n, *sample_shape); return the slots written (int64).

        New samples get the maximum priority stored before this call (1.0 when empty) unless
        ``priorities`` (n,) are given. When full, the oldest samples are overwritten; adding
        more than ``capacity`` at once keeps the newest ``capacity`` (in the slots n single
        adds would give them).
        """
        if not isinstance(samples, Tensor):
            raise TypeError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
        if samples.dim() < 1:
            raise ValueError(
                f"samples must have a batch dim (n, *), got shape {tuple(samples.shape)}"
            )
        # The first batch fixes shape, dtype and device (storage allocated once it is valid).
        if self._samples is not None and tuple(samples.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"samples must have shape (n, *{self.sample_shape}) like the stored ones, "
                f"got {tuple(samples.shape)}"
            )
        if self._samples is not None and (
            samples.dtype != self._samples.dtype or samples.device != self._samples.device
        ):
            raise TypeError(
                f"samples must be {self._samples.dtype} on {self._samples.device} like the stored "
                f"ones, got {samples.dtype} on {samples.device}"
            )
        n = samples.shape[0]
        if priorities is None:
            max_p = self._priorities[: self._size].max() if self._size else 1.0
            new_p = torch.full((n,), float(max_p), dtype=torch.float64, device=samples.device)
        else:
            new_p = self._as_priorities("priorities", priorities, n, samples.device)
        if self._samples is None:
            shape = (self.capacity, *samples.shape[1:])
            self._samples = torch.empty(shape, dtype=samples.dtype, device=samples.device)
            self._priorities = torch.zeros(
                self.capacity, dtype=torch.float64, device=samples.device
            )
        kept = min(n, self.capacity)
        first = n - kept  # samples before this one would be overwritten within the same add
        slots = (self._next + torch.arange(first, n, device=samples.device)) % self.capacity
        self._samples[slots] = samples[first:].detach()
        self._priorities[slots] = new_p[first:]
        self._next = (self._next + n) % self.capacity
        self._size = min(self._size + n, self.capacity)
        return slots

    def update_priorities(self, indices: Tensor | Sequence[int], priorities: Any) -> None:
        """Set the priorities (|delta| >= 0, finite) of the slots ``indices`` (k,).

        ``indices`` are slot numbers: an integer tensor (int8 to int64) or a sequence of ints;
        bool and uint8 tensors, which torch would read as masks, are refused. ``priorities``
        (k,) are real numbers (a tensor or a sequence; complex, bool and strings are refused).
        With repeated indices one of the given values is kept (in SSD-KD a repeated sample
        gets the same priority each time it appears).
        """
        if not isinstance(indices, Tensor):
            values = list(indices)
            try:
                values = [_check_index("indices", i) for i in values]
            except TypeError:
                raise TypeError(f"indices must be integers, got {values!r}") from None
            indices = torch.tensor(values, dtype=torch.int64)
        idx = indices
        if idx.dtype in (torch.bool, torch.uint8):
            raise TypeError(
                f"indices must be integer slot numbers, got a {idx.dtype} tensor, which torch "
                f"would read as a mask: pass the slots, e.g. mask.nonzero().squeeze(1)"
            )
        if not _is_integer(idx.dtype):
            raise TypeError(f"indices must be an integer tensor, got {idx.dtype}")
        idx = idx.to(torch.int64)  # int8 / int16 / int32 / unsigned: indexing takes int64
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        if self._size == 0:
            raise ValueError("cannot update priorities of an empty buffer")
        p = self._as_priorities("priorities", priorities, idx.shape[0], self._priorities.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._size):
            raise ValueError(
                f"indices must lie in [0, {self._size}) (the filled slots), got values from "
                f"{int(idx.min())} to {int(idx.max())} (shape {tuple(idx.shape)})"
            )
        self._priorities[idx.to(p.device)] = p

    # ------------------------------------------------------------------ reading
    def probabilities(self) -> Tensor:
        """P (len,), float64: (priority + eps)^alpha normalised to sum 1, slot order."""
        if self._size == 0:
            raise ValueError("the buffer is empty: add samples first")
        q = (self._priorities[: self._size] + self.eps).pow(self.alpha)
        total = q.sum()
        if not math.isfinite(total):  # unreachable through the public API; no misleading "0"
            raise ValueError(f"the priorities sum to {total.item()}: no sample can be drawn")
        if not total > 0:
            raise ValueError("every priority is 0 and eps = 0: no sample can be drawn")
        return q / total

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``batch_size`` slots with replacement with probability P.

        Returns ``(indices, samples, weights)``: int64 slots (batch_size,), the samples
        (batch_size, *sample_shape) and importance weights (batch_size,) (float64 for float64
        samples, float32 otherwise). ``generator`` must live on the samples' device.
        """
        _check_count("batch_size", batch_size)
        probs = self.probabilities()
        indices = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        p = probs[indices]
        if self.normalize_weights:
            # (N p)^-beta / (N P_min)^-beta; P_min over reachable slots (P = 0 only if eps = 0).
            p_min = torch.where(probs > 0, probs, torch.ones_like(probs)).min()
            weights = (p_min / p).pow(self.beta)
        else:
            weights = (self._size * p).pow(-self.beta)
        return indices, self._samples[indices], weights.to(compute_dtype(self._samples))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """A copy of the buffer: hyperparameters, filled samples, priorities, next slot."""
        filled = self._size
        return {
            "capacity": self.capacity,
            "alpha": self.alpha,
            "beta": self.beta,
            "eps": self.eps,
            "normalize_weights": self.normalize_weights,
            "samples": None if self._samples is None else self._samples[:filled].clone(),
            "priorities": None if self._priorities is None else self._priorities[:filled].clone(),
            "next_index": self._next,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same capacity); sampling then resumes identically.

        The state is checked before anything changes: ``samples`` (len, *sample_shape) and
        ``priorities`` (len,) tensors (real floating priorities, finite and >= 0; both None
        for an empty buffer), len <= capacity, and ``next_index`` an int that the FIFO order
        can produce: ``len`` while the buffer is not full (slots fill in order), any slot in
        [0, capacity) once it is.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state_dict is missing keys {missing}")
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"state_dict has capacity {state['capacity']}, this buffer {self.capacity}"
            )
        samples, priorities = state["samples"], state["priorities"]
        next_index = _check_index("state_dict next_index", state["next_index"])
        alpha = _check_nonnegative("alpha", state["alpha"])
        beta = _check_nonnegative("beta", state["beta"])
        eps = _check_nonnegative("eps", state["eps"])
        if samples is None and priorities is None:
            if next_index != 0:
                raise ValueError(
                    f"state_dict next_index must be 0 for an empty buffer, got {next_index}"
                )
        else:
            size = self._check_state_tensors(samples, priorities)
            if size < self.capacity and next_index != size:
                raise ValueError(
                    f"state_dict next_index must be {size} (the buffer has {size} of "
                    f"{self.capacity} slots filled, which fill in order), got {next_index}"
                )
            if not 0 <= next_index < self.capacity:
                raise ValueError(
                    f"state_dict next_index must lie in [0, {self.capacity}) (a slot of the full "
                    f"buffer), got {next_index}"
                )
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.normalize_weights = bool(state["normalize_weights"])
        if samples is None:
            self._samples = self._priorities = None
            self._size = self._next = 0
            return
        self._samples = samples.new_empty((self.capacity, *samples.shape[1:]))
        self._priorities = torch.zeros(self.capacity, dtype=torch.float64, device=samples.device)
        self._size = samples.shape[0]
        self._samples[: self._size] = samples
        self._priorities[: self._size] = priorities.to(self._priorities)
        self._next = next_index

    def _check_state_tensors(self, samples: Any, priorities: Any) -> int:
        """Validate a state's samples and priorities; return the number of samples."""
        for name, value in (("samples", samples), ("priorities", priorities)):
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"state_dict {name} must be a torch.Tensor (both None for an empty buffer), "
                    f"got {type(value).__name__}"
                )
        if samples.dim() < 1:
            raise ValueError(
                f"state_dict samples must have a batch dim (len, *), got shape "
                f"{tuple(samples.shape)}"
            )
        size = samples.shape[0]
        if size > self.capacity:
            raise ValueError(
                f"state_dict holds {size} samples (shape {tuple(samples.shape)}), more than "
                f"capacity {self.capacity}"
            )
        if not priorities.is_floating_point():
            raise TypeError(
                f"state_dict priorities must be a real floating tensor, got {priorities.dtype}"
            )
        if priorities.shape != (size,):
            raise ValueError(
                f"state_dict samples and priorities are inconsistent: priorities must have "
                f"shape ({size},) like the samples {tuple(samples.shape)}, got "
                f"{tuple(priorities.shape)}"
            )
        _check_priority_values("state_dict priorities", priorities.detach().to(torch.float64))
        return size

    def __repr__(self) -> str:
        return (
            f"PrioritizedReplayBuffer(capacity={self.capacity}, len={self._size}, "
            f"alpha={self.alpha}, beta={self.beta}, eps={self.eps}, "
            f"normalize_weights={self.normalize_weights})"
        )


def ssd_kd_priorities(kl_per_sample: Tensor, previous_weights: Tensor | None = None) -> Tensor:
    """SSD-KD priorities |delta| = |w_{i-1} * KL| (B,), detached (semantics 5).

    Args:
        kl_per_sample: KL(p_t || p_s) per sample (B,), e.g. ``per_sample_kl(zs, zt)``.
        previous_weights: the samples' importance weights from the previous round (B,),
            as returned by :meth:`PrioritizedReplayBuffer.sample`; None means w_{-1} = 1.

    Returns the absolute value (what the buffer stores): a KL that rounding made slightly
    negative stays a valid priority. Computed in promote_types(inputs, float32).
    """
    check_tensor("kl_per_sample", kl_per_sample)
    if kl_per_sample.dim() != 1:
        raise ValueError(f"kl_per_sample must be 1-D (B,), got shape {tuple(kl_per_sample.shape)}")
    kl = kl_per_sample.detach()
    if previous_weights is None:
        return kl.to(compute_dtype(kl)).abs()
    check_tensor("previous_weights", previous_weights)
    if previous_weights.shape != kl.shape or previous_weights.device != kl.device:
        raise ValueError(
            f"previous_weights must match kl_per_sample {tuple(kl.shape)} on {kl.device}, got "
            f"{tuple(previous_weights.shape)} on {previous_weights.device}"
        )
    dtype = compute_dtype(kl, previous_weights)
    return (previous_weights.detach().to(dtype) * kl.to(dtype)).abs()


def diversity_difficulty_weights(
    teacher_logits: Tensor, gamma: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """SSD-KD diversity-aware modulating function phi (B,) [unverified form: semantics 5].

    phi(x) = (1 / count of x's teacher-predicted class in the batch) * (1 - p_t(class | x))^gamma,
    p_t = softmax(teacher_logits / temperature); the predicted class is the argmax (ties go to
    the lowest index). Over-represented classes are down-weighted (a class's diversity
    factors sum to 1) and confident, easy samples count less. Unnormalised: divide by
    ``phi.mean()`` for a mean of 1.

    phi is a weight: it is returned detached (no gradient through the count, which has none,
    nor through the difficulty factor), in promote_types(teacher_logits, float32).

    Args:
        teacher_logits: (B, C) teacher logits.
        gamma: difficulty exponent (>= 0); 0 keeps the diversity factor only. Default 1.
        temperature: softmax temperature (> 0). Default 1.
    """
    check_tensor("teacher_logits", teacher_logits)
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] == 0 or teacher_logits.shape[1] == 0:
        raise ValueError(
            "teacher_logits must be a non-empty (B, C) tensor, got shape "
            f"{tuple(teacher_logits.shape)}"
        )
    gamma = _check_nonnegative("gamma", gamma)
    check_positive("temperature", temperature, finite=True)
    z = teacher_logits.detach().to(compute_dtype(teacher_logits))
    probs = torch.softmax(z / temperature, dim=1)
    predicted = probs.argmax(dim=1)  # (B,)
    # Class counts by scatter_add: no bincount (its output size is data-dependent).
    counts = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device).scatter_add(
        0, predicted, torch.ones_like(predicted, dtype=z.dtype)
    )
    diversity = 1.0 / counts.gather(0, predicted)
    difficulty = (1.0 - probs.gather(1, predicted[:, None]).squeeze(1)).pow(gamma)
    return diversity * difficulty
