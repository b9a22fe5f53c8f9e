"""The ``fused_linear_distill`` op (semantics 3.2): its implementations and samples.

* reference: :func:`kdfast.reference.fused_linear_distill.fused_linear_distill`, the
  materialised logits;
* every compiled backend with the chunks' logit kernels (cpp on CPU, Triton): the chunked
  path of :mod:`kdfast.fused_linear`, one function; its logit ops (``kd_loss`` /
  ``jsd_loss``) are dispatched per chunk, so forcing a backend runs that backend's
  kernels. A backend that lacks the kernel of the divergence asked for declares it (a
  limit), and the automatic choice moves on.

Implementations take validated ``(xs, ws, bs, xt, wt, bt, labels, mask, options,
chunk_size)`` with (T, H) hidden states.
"""

from __future__ import annotations

import torch

from kdfast import _dispatch, fused_linear  # a partial module here: used at call time
from kdfast.ops._samples import BadInput, Contract, Sample, declare, randn
from kdfast.reference.fused_linear_distill import fused_linear_distill as reference

#: the logit op each divergence runs per chunk ("dist": plain PyTorch, two passes)
LOGIT_OPS = {"kl": "kd_loss", "reverse_kl": "jsd_loss", "jsd": "jsd_loss"}


def _logit_kernel_limit(backend: str):
    """The chunks' logit op on ``backend`` must run: a kernel for the divergence's op,
    within that kernel's own limits (e.g. kd_loss's temperature limit), and, unless a
    backend is forced, one the automatic choice takes (the chunks dispatch their logit op
    as the call does: a kernel that is opt-in, e.g. not yet run on a GPU, runs only when
    forced)."""

    def limit(*args, **kwargs) -> str | None:
        if len(args) < 10:  # a backend query by tensors alone (e.g. the bench's) is not limited
            return None
        xs, options = args[0], args[8]
        op = LOGIT_OPS.get(options.divergence)
        if op is None:  # "dist": plain PyTorch per chunk, runs wherever the backend does
            return None
        if op == "kd_loss":
            inner = (xs, xs, options.temperature, "sum", None, "logits")
        else:
            inner = (xs, xs, options.jsd_beta, options.temperature, "sum", None)
        device, dtypes = xs.device.type, (xs.dtype,)
        automatic = _dispatch.forced_backend() is None
        reason = _dispatch._rejection(op, backend, device, dtypes, inner, {}, automatic)
        return None if reason is None else f"its {op} cannot run: {reason}"

    return limit


def _reference(xs, ws, bs, xt, wt, bt, labels, mask, options, chunk_size):
    """The materialised reference (it has no chunks: ``chunk_size`` is unused)."""
    return reference(xs, ws, bs, xt, wt, bt, labels, mask, options)


def _chunked(*args):
    return fused_linear.chunked(*args)


_dispatch.implement("fused_linear_distill", "reference", _reference)
for _backend, _devices in (("cpp", {"cpu"}), ("triton", None)):
    if _dispatch.BACKENDS[_backend].unavailable is None:
        _dispatch.implement(
            "fused_linear_distill",
            _backend,
            _chunked,
            devices=_devices,
            limit=_logit_kernel_limit(_backend),
        )


# --- samples ---------------------------------------------------------------------------

T, H, HT, V = 13, 6, 5, 11


def _heads(gen, tokens=(T,), scale=1.0, bias=False, ignore=True):
    """Student and teacher heads on (tokens..., H) hidden states, labels with every fourth
    token from the third ignored (the first stays: the NaN test poisons it), biases
    optionally."""
    xs, ws = scale * randn(gen, *tokens, H), randn(gen, V, H)
    xt, wt = scale * randn(gen, *tokens, HT), randn(gen, V, HT)
    labels = torch.randint(0, V, tokens, generator=gen)
    if ignore:
        labels.view(-1)[2::4] = -100
    kwargs = {"labels": labels}
    if bias:
        kwargs.update(student_bias=randn(gen, V), teacher_bias=randn(gen, V))
    return (xs, ws, xt, wt), kwargs


def _sample(name, tags=("small",), heads=None, **options):
    def make(gen):
        args, kwargs = _heads(gen, **(heads or {}))
        return args, {**kwargs, **options}

    return Sample(name, make, frozenset(tags))


def _mask(gen):
    args, kwargs = _heads(gen, ignore=False)
    mask = torch.ones(T, dtype=torch.bool)
    mask[1::3] = False
    return args, {**kwargs, "mask": mask, "divergence": "jsd", "beta": 0.7, "chunk_size": 5}


def _args(**kwargs):
    def make():
        g = torch.Generator().manual_seed(0)
        (xs, ws, xt, wt), base = _heads(g)
        return (xs, ws, xt, wt), {"divergence": "jsd", **base, **kwargs}

    return make


declare(
    Contract(
        "fused_linear_distill",
        "kdfast.functional:fused_linear_distill",
        (
            _sample("jsd", divergence="jsd", beta=0.3, temperature=2.0, chunk_size=4),
            _sample(
                "kl_hard", divergence="kl", temperature=2.0, hard_loss_weight=0.4, chunk_size=5
            ),  # fmt: skip
            _sample(
                "reverse_kl_bias",
                divergence="reverse_kl",
                heads={"bias": True},
                soft_loss_weight=0.6,
                hard_loss_weight=0.5,
                chunk_size=3,
            ),  # fmt: skip
            _sample("jsd_none", divergence="jsd", reduction="none", chunk_size=4),
            _sample("kl_sum_one_row_chunks", divergence="kl", reduction="sum", chunk_size=1),
            _sample("jsd_beta_0", divergence="jsd", beta=0.0, temperature=0.7),
            _sample("jsd_beta_1_auto_chunk", divergence="jsd", beta=1.0),
            Sample("jsd_mask", _mask, frozenset({"small"})),
            # past the fused KL kernels' temperature limit: the chunks' logit op is the
            # reference, differentiated by autograd inside the chunked path
            _sample("kl_high_temperature", divergence="kl", temperature=30.0, chunk_size=4),
            _sample("dist", divergence="dist", temperature=2.0, chunk_size=4),
            _sample(
                "dist_hard_bias",
                divergence="dist",
                heads={"bias": True},
                inter_weight=0.5,
                intra_weight=2.0,
                hard_loss_weight=0.3,
                chunk_size=5,
            ),  # fmt: skip
            _sample("leading_dims", divergence="jsd", heads={"tokens": (3, 5)}, chunk_size=4),
            # logits of +-40: at +-200 every row saturates and the teacher gradient is ~1e-22,
            # where the float64 reference's autograd errs by 1e-17 (measured against mpmath;
            # the cpp kernel by 2e-22): parity would test the reference's rounding
            _sample(
                "extreme_logits",
                (),
                divergence="jsd",
                heads={"scale": 6.0},
                hard_loss_weight=1.0,
                chunk_size=6,
            ),  # fmt: skip
        ),
        grad_args=(0, 1, 2, 3),
        bad_inputs=(
            BadInput("divergence", _args(divergence="kld"), ValueError, "divergence must be"),
            BadInput("chunk_size", _args(chunk_size=0), ValueError, "chunk_size must be"),
            BadInput(
                "hard_without_labels",
                _args(labels=None, hard_loss_weight=1.0),
                ValueError,
                "needs labels",
            ),  # fmt: skip
            BadInput("float_labels", _args(labels=torch.zeros(T)), TypeError, "labels must"),
            BadInput("beta", _args(beta=2.0), ValueError, r"beta must be in \[0, 1\]"),
            BadInput("temperature", _args(temperature=0.0), ValueError, "temperature"),
        ),
    )
)
