"""Sample inputs that each op declares next to its registration, as data.

Every ``kdfast/ops/<op>.py`` calls :func:`declare` with a :class:`Contract`: the public
function that takes the samples' arguments, named :class:`Sample` cases (random and
adversarial inputs, built for any device and dtype) and the :class:`BadInput` cases that
must raise a clear error. The contract suite (``tests/contract/``) crosses every registered
implementation with every device and dtype it supports and every sample, so a new op joins
it by declaring samples here, with no edit to the suite; ``tools/gpu_check.sh`` runs the
same suite on a GPU.

Samples are built in float64 on the CPU from a fixed seed, then rounded to the dtype and
moved to the device: the float64 truth of a half-precision case is the float64 computation
on the same rounded inputs (docs/semantics.md section 7).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: the floating dtypes a sample may be asked for, lowest precision last
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Sample:
    """One named case: ``make(gen)`` returns ``(args, kwargs)`` of the public function with
    contiguous float64 CPU tensors (``gen``: a seeded ``torch.Generator``); the suite rounds
    them to the dtype under test, moves them to the device and applies ``view``.

    Tags (free-form, read by the suite):

    * ``"small"``: cheap enough for float64 gradcheck;
    * ``"exact_duplicates"``: exactly equal feature rows, where kernels deliberately give a
      zero gradient through the pair and the reference ~1/eps (docs/semantics.md 1.5): only
      finiteness of the gradients is compared;
    * ``"float64_only"``: not representable in half precision (e.g. a large common offset);
    * ``"float32_and_up"``: not representable in float16 / bfloat16;
    * ``"low_precision_first_grad_only"``: below float64 only the first argument's gradient
      is held to the tolerance table, the others only to finiteness (a known accuracy gap,
      named where the sample is declared).
    """

    name: str
    make: Callable[[torch.Generator], tuple[tuple, dict]]
    tags: frozenset[str] = frozenset()
    #: maps the converted positional arguments to the layout under test (a transpose, an
    #: expanded row, a strided slice), so the rounding happens on dense data first
    view: Callable[[tuple], tuple] | None = None
    #: known accuracy gaps, ("<backend>/<dtype>[/<device>]", why): the contract's parity test
    #: of that implementation and dtype (on that device only, when one is named) is a strict
    #: xfail, so it fails once the gap is closed
    gaps: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BadInput:
    """Arguments that must make the public function raise ``error`` matching ``match``."""

    name: str
    make: Callable[[], tuple[tuple, dict]]
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class Contract:
    """What the contract suite needs to know about one dispatcher op.

    Args:
        op: the dispatcher op's name (``kdfast._dispatch.implement``).
        public: ``"module:function"`` taking the samples' arguments, e.g.
            ``"kdfast.functional:rkd_angle"``; it validates them and calls the dispatcher.
        samples: the cases every implementation runs.
        grad_args: positions of the arguments to differentiate (floating tensors).
        bad_inputs: cases that must raise a clear error.
    """

    op: str
    public: str
    samples: tuple[Sample, ...]
    grad_args: tuple[int, ...] = (0, 1)
    bad_inputs: tuple[BadInput, ...] = field(default=())

    def function(self) -> Callable:
        """The public function (imported on first use: ops never import functional)."""
        import importlib

        module, name = self.public.split(":")
        return getattr(importlib.import_module(module), name)


CONTRACTS: dict[str, Contract] = {}


def declare(contract: Contract) -> None:
    """Make ``contract`` part of the contract suite (one per op)."""
    if contract.op in CONTRACTS:
        raise ValueError(f"op {contract.op!r} declared its contract twice")
    names = [s.name for s in contract.samples]
    if len(set(names)) != len(names):
        raise ValueError(f"{contract.op}: sample names repeat: {names}")
    CONTRACTS[contract.op] = contract


def build(sample: Sample, device: str | torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """``sample``'s arguments with floating tensors rounded to ``dtype`` on ``device``, then
    ``sample.view`` applied (non-contiguous and expanded layouts)."""
    args, kwargs = sample.make(torch.Generator().manual_seed(0))
    args = tuple(_convert(a, device, dtype) for a in args)
    kwargs = {k: _convert(v, device, dtype) for k, v in kwargs.items()}
    return (sample.view(args) if sample.view is not None else args), kwargs


def _convert(value, device, dtype):
    if isinstance(value, Tensor):
        target = dtype if value.is_floating_point() else value.dtype
        return value.to(device=device, dtype=target).contiguous()
    return value


def randn(gen: torch.Generator, *shape: int) -> Tensor:
    """float64 standard normal CPU tensor from ``gen``."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64)
