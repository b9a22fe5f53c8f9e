"""fused_linear_distill (kdfast/fused_linear.py, semantics 3.2): the chunked path against the
materialised reference in float64 for every divergence, reduction, label / mask / bias
combination and chunk size; gradcheck; TRL's, Liger-Kernel's and DIST's official formulas
written out; clear errors; and a record of every tensor the chunked path creates (none is
(T, V)). "dist" (kdfast/_fused_linear_dist.py) has its own tests at the end."""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import compiled_backends
from test_dist_loss import official_dist
from test_jsd_loss import trl_generalized_jsd
from torch.utils._python_dispatch import TorchDispatchMode

import kdfast
from kdfast import _dispatch
from kdfast.functional import fused_linear_distill
from kdfast.losses import FusedLinearDistillationLoss
from kdfast.testing import rel_error as rel

F64 = torch.float64
T, H, HT, V = 13, 6, 5, 11
DIVERGENCES = ("kl", "reverse_kl", "jsd")


def make(seed=0, dtype=F64, bias=True, tokens=T, lead=None):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype).requires_grad_(grad)

    lead = lead or (tokens,)
    xs, ws = randn(*lead, H, grad=True), randn(V, H, grad=True)
    xt, wt = randn(*lead, HT), randn(V, HT)
    bs = randn(V, grad=True) if bias else None
    bt = randn(V) if bias else None
    labels = torch.randint(0, V, lead, generator=g)
    labels.view(-1)[::4] = -100
    mask = torch.ones(lead, dtype=torch.bool)
    mask.view(-1)[1::5] = False
    return xs, ws, bs, xt, wt, bt, labels, mask


def run(args, backend, grad_seed=1, **kwargs):
    xs, ws, bs, xt, wt, bt, *_ = args
    with kdfast.use_backend(backend):
        loss = fused_linear_distill(xs, ws, xt, wt, student_bias=bs, teacher_bias=bt, **kwargs)
    params = [p for p in (xs, ws, bs) if p is not None]
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed))
    return loss, torch.autograd.grad(loss, params, upstream.to(loss.dtype))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ("batchmean", "sum", "none"))
@pytest.mark.parametrize("chunk_size", (1, 4, T, None))
@pytest.mark.parametrize("tokens", ("labels", "mask", "both", "all"))
def test_chunked_matches_reference_float64(divergence, reduction, chunk_size, tokens):
    args = make(bias=tokens != "all")
    labels, mask = args[6], args[7]
    kwargs = dict(
        divergence=divergence,
        reduction=reduction,
        beta=0.3,
        temperature=2.0,
        chunk_size=chunk_size,
        labels=labels if tokens in ("labels", "both") else None,
        mask=mask if tokens in ("mask", "both") else None,
        hard_loss_weight=0.4 if tokens in ("labels", "both") else 0.0,
        soft_loss_weight=0.7,
    )
    loss_ref, grads_ref = run(args, "reference", **kwargs)
    loss, grads = run(args, None, **kwargs)
    assert loss.dtype == F64 and loss.shape == loss_ref.shape
    assert rel(loss, loss_ref) <= 1e-9
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel(g, g_ref) <= 1e-7


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_gradcheck(divergence, reduction):
    xs, ws, bs, xt, wt, bt, labels, mask = make(tokens=5)

    def f(xs, ws, bs):
        return fused_linear_distill(
            xs, ws, xt, wt, divergence=divergence, student_bias=bs, teacher_bias=bt,
            labels=labels, mask=mask, hard_loss_weight=0.5, reduction=reduction, beta=0.4,
            temperature=1.5, chunk_size=2,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, (xs, ws, bs))


def test_leading_dims_are_tokens():
    """(B, L, H) hidden states with (B, L) labels equal the flattened (B * L, H) call."""
    xs, ws, bs, xt, wt, bt, labels, _ = make(lead=(2, 7))
    kwargs = dict(divergence="jsd", labels=labels, hard_loss_weight=1.0, chunk_size=3)
    a = fused_linear_distill(xs, ws, xt, wt, **kwargs)
    kwargs["labels"] = labels.reshape(14)
    b = fused_linear_distill(xs.reshape(14, H), ws, xt.reshape(14, HT), wt, **kwargs)
    assert rel(a, b) <= 1e-12


@pytest.mark.parametrize("beta", (0.0, 0.1, 0.5, 1.0))
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_jsd_is_trl_generalized_jsd(beta, temperature):
    """TRL's GKD loss on the materialised (B, L, V) logits, labels == -100 ignored."""
    xs, ws, bs, xt, wt, bt, labels, _ = make(lead=(2, 7))
    zs, zt = F.linear(xs, ws, bs), F.linear(xt, wt, bt)
    trl = trl_generalized_jsd(zs, zt, labels, beta, temperature, "batchmean")
    ours = fused_linear_distill(
        xs, ws, xt, wt, divergence="jsd", student_bias=bs, teacher_bias=bt, labels=labels,
        beta=beta, temperature=temperature, chunk_size=4,
    )  # fmt: skip
    assert rel(ours, trl) <= 1e-12
    if beta in (0.0, 1.0):
        divergence = "reverse_kl" if beta == 1.0 else "kl"
        kl = fused_linear_distill(
            xs, ws, xt, wt, divergence=divergence, student_bias=bs, teacher_bias=bt,
            labels=labels, temperature=temperature, chunk_size=4,
        )  # fmt: skip
        scale = temperature**2 if divergence == "kl" else 1.0  # only "kl" is Hinton's T^2
        assert rel(kl, scale * trl) <= 1e-12


def test_liger_hard_and_soft_weights():
    """Liger-Kernel's fused linear JSD written out: ``w_hard * CE_sum / n + w_soft *
    JSD_sum / n`` over the non-ignored tokens n, CE on the untempered student logits."""
    xs, ws, bs, xt, wt, bt, labels, _ = make()
    beta, temperature, w_hard, w_soft = 0.25, 3.0, 0.3, 0.6
    zs, zt = F.linear(xs, ws, bs), F.linear(xt, wt, bt)
    keep = labels != -100
    log_s = F.log_softmax(zs / temperature, dim=-1)
    log_t = F.log_softmax(zt / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_s + math_log(1 - beta), log_t + math_log(beta)]), 0)
    jsd = beta * F.kl_div(log_m, log_t, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
        log_m, log_s, reduction="none", log_target=True
    )
    n = keep.sum()
    ce = F.cross_entropy(zs, labels, reduction="sum", ignore_index=-100)
    liger = w_hard * ce / n + w_soft * jsd.sum(-1)[keep].sum() / n
    loss_fn = FusedLinearDistillationLoss(
        "jsd", beta=beta, temperature=temperature, soft_loss_weight=w_soft,
        hard_loss_weight=w_hard, chunk_size=5,
    )  # fmt: skip
    ours = loss_fn(xs, ws, xt, wt, labels, bs, bt)
    assert rel(ours, liger) <= 1e-12
    assert rel(torch.autograd.grad(ours, ws)[0], torch.autograd.grad(liger, ws)[0]) <= 1e-10


def math_log(x: float) -> torch.Tensor:
    return torch.log(torch.tensor(x, dtype=F64))


def test_float32_and_bfloat16_close_to_float64_truth():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        args = make(dtype=dtype)
        truth_args = [None if a is None else a.detach().to(F64) if a.is_floating_point() else a
                      for a in args]  # fmt: skip
        for a, b in zip(truth_args[:3], args[:3], strict=True):
            if a is not None:
                a.requires_grad_(b.requires_grad)
        kwargs = dict(divergence="jsd", labels=args[6], hard_loss_weight=0.5, chunk_size=4)
        loss, grads = run(args, None, **kwargs)
        loss_truth, grads_truth = run(truth_args, "reference", **kwargs)
        assert loss.dtype == torch.float32
        assert rel(loss.double(), loss_truth) <= tol
        assert grads[1].dtype == dtype
        assert rel(grads[1].double(), grads_truth[1]) <= tol


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_teacher_gradients_when_the_teacher_requires_grad(divergence, reduction):
    """Teacher tensors that require grad get the reference's gradients (float64, chunked and
    through the autograd fallback past the fused kernels' temperature limit)."""
    args = make()
    for a in args[3:6]:
        a.requires_grad_(True)
    teacher = args[3:6]
    for temperature in (2.0, 30.0):  # 30: kd_loss's fused kernels hand over to the reference
        kwargs = dict(divergence=divergence, labels=args[6], hard_loss_weight=0.3, beta=0.3,
                      temperature=temperature, reduction=reduction, chunk_size=4)  # fmt: skip
        got, want = [], []
        for backend, out in ((None, got), ("reference", want)):
            with kdfast.use_backend(backend):
                loss = fused_linear_distill(
                    args[0], args[1], args[3], args[4], student_bias=args[2],
                    teacher_bias=args[5], **kwargs,
                )  # fmt: skip
            upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=F64).reshape(loss.shape)
            out += torch.autograd.grad(loss, teacher, upstream)
        for g, g_ref in zip(got, want, strict=True):
            assert rel(g, g_ref) <= 1e-7


def test_teacher_gradcheck():
    xs, ws, bs, xt, wt, bt, labels, mask = make(tokens=5)

    def f(xt, wt, bt):
        return fused_linear_distill(
            xs, ws, xt, wt, divergence="jsd", student_bias=bs, teacher_bias=bt,
            labels=labels, mask=mask, beta=0.4, temperature=1.5, chunk_size=2,
        )  # fmt: skip

    assert torch.autograd.gradcheck(
        f, (xt.requires_grad_(), wt.requires_grad_(), bt.requires_grad_())
    )


def test_frozen_teacher_gets_no_gradient():
    xs, ws, bs, xt, wt, bt, labels, _ = make()
    loss = fused_linear_distill(xs, ws, xt, wt, divergence="kl", labels=labels, chunk_size=4)
    loss.backward()
    assert ws.grad is not None and not wt.requires_grad and wt.grad is None


def test_no_grad_computes_no_gradient():
    xs, ws, bs, xt, wt, bt, labels, _ = make()
    with torch.no_grad():
        a = fused_linear_distill(xs, ws, xt, wt, divergence="jsd", chunk_size=4)
    b = fused_linear_distill(xs, ws, xt, wt, divergence="jsd", chunk_size=4)
    assert not a.requires_grad and rel(a, b.detach()) == 0


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten or custom op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.shapes += [tuple(o.shape) for o in flat if isinstance(o, torch.Tensor)]
        return out


@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_chunked_path_never_creates_a_tokens_by_vocab_tensor(reduction):
    tokens, vocab, chunk = 64, 50, 8
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(tokens, H, generator=g, requires_grad=True)
    ws = torch.randn(vocab, H, generator=g, requires_grad=True)
    xt, wt = torch.randn(tokens, HT, generator=g), torch.randn(vocab, HT, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    with _Shapes() as mode:
        loss = fused_linear_distill(
            xs, ws, xt, wt, divergence="jsd", labels=labels, hard_loss_weight=1.0,
            reduction=reduction, chunk_size=chunk,
        )  # fmt: skip
        loss.sum().backward()
    largest = max(s[0] * s[1] for s in mode.shapes if len(s) == 2 and vocab in s)
    assert largest == chunk * vocab
    with _Shapes() as mode, kdfast.use_backend("reference"):
        fused_linear_distill(xs, ws, xt, wt, divergence="jsd").backward()
    assert (tokens, vocab) in mode.shapes  # the recorder sees the materialised logits


@pytest.mark.parametrize("backend", ["triton"])
def test_automatic_choice_passes_over_an_opt_in_logit_kernel(backend, monkeypatch):
    """The chunks dispatch their logit op as the call does: automatically, a backend whose
    kernel for the divergence is opt-in (as a new kernel not yet run on a GPU is on CUDA,
    kdfast._dispatch.needs_gpu_record) is passed over for the whole op and its kernel never
    runs; forced, the backend runs that kernel. (Triton on CPU tensors: the interpreter.)"""
    if backend not in compiled_backends("cpu", op="jsd_loss"):
        pytest.skip(f"{backend} does not run jsd_loss on CPU tensors here")
    impl = _dispatch.implementations("jsd_loss")[backend]
    opt_in = dataclasses.replace(impl, opt_in="a stand-in for a GPU record not yet made")
    monkeypatch.setitem(_dispatch._IMPLS["jsd_loss"], backend, opt_in)
    chosen = []
    select = _dispatch.select

    def spy(op, *args, **kwargs):
        name, fn = select(op, *args, **kwargs)
        chosen.append((op, name))
        return name, fn

    monkeypatch.setattr(_dispatch, "select", spy)
    xs, ws, bs, xt, wt, bt, labels, _ = make()
    want = fused_linear_distill(xs, ws, xt, wt, divergence="kl", chunk_size=4)
    assert ("fused_linear_distill", backend) in chosen  # kd_loss's kernel is not opt-in
    for divergence in ("jsd", "reverse_kl"):
        chosen.clear()
        got = fused_linear_distill(xs, ws, xt, wt, divergence=divergence, chunk_size=4)
        assert ("fused_linear_distill", backend) not in chosen, chosen
        inner = {name for op, name in chosen if op == "jsd_loss"}
        assert inner and backend not in inner, chosen  # the next backend (cpp or reference)
        chosen.clear()
        with kdfast.use_backend(backend):
            forced = fused_linear_distill(xs, ws, xt, wt, divergence=divergence, chunk_size=4)
        assert ("fused_linear_distill", backend) in chosen and ("jsd_loss", backend) in chosen
        assert rel(forced, got) <= 1e-12
    assert want.isfinite()


def test_auto_chunk_size_follows_the_memory_budget():
    from kdfast.fused_linear import CHUNK_BUFFERS, CHUNK_MEMORY_BUDGET, auto_chunk_size

    chunk = auto_chunk_size(8192, 128256, torch.bfloat16)
    assert chunk * CHUNK_BUFFERS * 128256 * 4 <= CHUNK_MEMORY_BUDGET
    assert chunk >= 64
    assert auto_chunk_size(10, 32000, torch.float32) == 10
    assert auto_chunk_size(10, 1 << 40, torch.float64) == 1


def _call(**overrides):
    xs, ws, bs, xt, wt, bt, labels, mask = make()
    kwargs = dict(student_input=xs, student_weight=ws, teacher_input=xt, teacher_weight=wt)
    kwargs.update(divergence="kl")
    kwargs.update(overrides)
    return fused_linear_distill(**kwargs)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"student_weight": torch.randn(V, H + 1)}, ValueError, r"H = student_weight.shape\[1\]"),
        ({"teacher_weight": torch.randn(V + 1, HT)}, ValueError, "share the vocabulary V"),
        ({"teacher_input": torch.randn(T + 1, HT)}, ValueError, "same leading"),
        (
            {"student_input": torch.randn(0, H), "teacher_input": torch.randn(0, HT)},
            ValueError,
            "at least one token",
        ),
        ({"student_weight": torch.randn(V)}, ValueError, r"student_weight must be a non-empty"),
        ({"student_input": torch.randn(T, H).long()}, TypeError, "student_input must be float"),
        ({"student_bias": torch.randn(V + 1)}, ValueError, r"student_bias must have shape \(11,\)"),
        ({"labels": torch.zeros(T + 1).long()}, ValueError, r"labels must have shape \(13,\)"),
        ({"labels": torch.zeros(T)}, TypeError, "labels must be an integer"),
        ({"mask": torch.ones(T)}, TypeError, "mask must have dtype torch.bool"),
        ({"divergence": "dist2"}, ValueError, "divergence must be one of"),
        ({"reduction": "mean"}, ValueError, "reduction must be one of"),
        ({"beta": 1.5}, ValueError, "beta"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"hard_loss_weight": 1.0}, ValueError, "needs labels"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_inputs(overrides, error, message):
    with pytest.raises(error, match=message):
        _call(**overrides)


class TinyCausalLM(torch.nn.Module):
    """A Hugging Face-style causal LM: embeddings, a body, ``lm_head`` (no download)."""

    def __init__(self, vocab, hidden, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = torch.nn.Embedding(vocab, hidden)
        self.body = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh())
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        return self.body(self.embed_tokens(input_ids))  # the last hidden states


def test_readme_llm_example():
    """The README's LLM distillation snippet, run as written there."""
    vocab = 97
    student, teacher = TinyCausalLM(vocab, 16, seed=0), TinyCausalLM(vocab, 32, seed=1)
    input_ids = torch.randint(0, vocab, (2, 9))
    labels = input_ids.clone()
    labels[:, :3] = -100  # prompt tokens

    loss_fn = kdfast.losses.FusedLinearDistillationLoss("jsd", beta=0.5, hard_loss_weight=0.5)
    with torch.no_grad():
        teacher_hidden = teacher(input_ids)
    loss = loss_fn(
        student(input_ids), student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels
    )
    loss.backward()

    assert student.lm_head.weight.grad is not None
    assert student.embed_tokens.weight.grad is not None
    with kdfast.use_backend("reference"):
        expected = loss_fn(
            student(input_ids), student.lm_head.weight, teacher_hidden, teacher.lm_head.weight,
            labels,
        )  # fmt: skip
    assert rel(loss.detach(), expected.detach()) <= 1e-5


# --- divergence "dist": two passes over the chunks, teacher gradients --------------------------

DIST = dict(divergence="dist", inter_weight=0.6, intra_weight=1.3, temperature=2.0)


def dist_args(seed=0, dtype=F64, teacher_grad=True, **kwargs):
    """make()'s tensors with the teacher's requiring grad (online distillation)."""
    args = make(seed, dtype, **kwargs)
    for x in args[3:6]:
        if x is not None:
            x.requires_grad_(teacher_grad)
    return args


def run_dist(args, backend, **kwargs):
    """(loss, gradients of every tensor of the six that requires grad)."""
    xs, ws, bs, xt, wt, bt, *_ = args
    with kdfast.use_backend(backend):
        loss = fused_linear_distill(xs, ws, xt, wt, student_bias=bs, teacher_bias=bt, **kwargs)
    params = [p for p in args[:6] if p is not None and p.requires_grad]
    return loss, torch.autograd.grad(3.0 * loss, params)


@pytest.mark.parametrize("chunk_size", (1, 3, T, None))
@pytest.mark.parametrize("tokens", ("labels", "mask", "both", "all"))
@pytest.mark.parametrize("teacher_grad", (True, False))
def test_dist_matches_reference_float64(chunk_size, tokens, teacher_grad):
    args = dist_args(bias=tokens != "all", teacher_grad=teacher_grad)
    labels, mask = args[6], args[7]
    kwargs = dict(
        DIST,
        chunk_size=chunk_size,
        labels=labels if tokens in ("labels", "both") else None,
        mask=mask if tokens in ("mask", "both") else None,
        hard_loss_weight=0.4 if tokens in ("labels", "both") else 0.0,
        soft_loss_weight=0.7,
    )
    loss_ref, grads_ref = run_dist(args, "reference", **kwargs)
    loss, grads = run_dist(args, None, **kwargs)
    assert loss.dtype == F64 and loss.shape == ()
    assert rel(loss, loss_ref) <= 1e-9
    assert len(grads) == (6 if tokens != "all" else 4) // (1 if teacher_grad else 2)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel(g, g_ref) <= 1e-7


def test_dist_is_the_official_formula_on_the_kept_rows():
    """hunto/DIST_KD on the materialised logits of the kept tokens, plus the mean CE."""
    xs, ws, bs, xt, wt, bt, labels, mask = make(lead=(2, 7))
    keep = (labels != -100) & mask
    zs, zt = F.linear(xs, ws, bs), F.linear(xt, wt, bt)
    official = official_dist(zs[keep], zt[keep], beta=0.6, gamma=1.3, tau=2.0)
    ce = F.cross_entropy(zs[keep], labels[keep])
    ours = fused_linear_distill(
        xs, ws, xt, wt, student_bias=bs, teacher_bias=bt, labels=labels, mask=mask,
        soft_loss_weight=0.7, hard_loss_weight=0.2, chunk_size=4, **DIST,
    )  # fmt: skip
    expected = 0.7 * official + 0.2 * ce
    assert rel(ours, expected) <= 1e-12
    assert rel(torch.autograd.grad(ours, ws)[0], torch.autograd.grad(expected, ws)[0]) <= 1e-10


def test_dist_gradcheck():
    """Student and teacher (all six tensors) at small sizes: 5 tokens, V = 4, H = 3, Ht = 2."""
    g = torch.Generator().manual_seed(0)
    shapes = ((5, 3), (4, 3), (4,), (5, 2), (4, 2), (4,))
    inputs = [torch.randn(s, generator=g, dtype=F64, requires_grad=True) for s in shapes]
    labels, mask = torch.tensor([0, -100, 3, 1, 2]), torch.tensor([1, 1, 1, 0, 1]).bool()

    def f(xs, ws, bs, xt, wt, bt):
        return fused_linear_distill(
            xs, ws, xt, wt, student_bias=bs, teacher_bias=bt, labels=labels, mask=mask,
            hard_loss_weight=0.5, chunk_size=2, **DIST,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, inputs)


def test_dist_one_kept_token_has_intra_one_and_none_gives_nan():
    """As dist_loss with B = 1: intra = 1 exactly, with zero gradient; no kept token: NaN."""
    xs, ws, bs, xt, wt, bt, labels, _ = dist_args()
    one = torch.zeros(T, dtype=torch.bool)
    one[5] = True
    kwargs = dict(DIST, student_bias=bs, teacher_bias=bt, chunk_size=4)
    for backend in ("reference", None):
        with kdfast.use_backend(backend):
            loss = fused_linear_distill(xs, ws, xt, wt, mask=one, **kwargs)
            inter_only = fused_linear_distill(
                xs, ws, xt, wt, mask=one, **{**kwargs, "intra_weight": 0.0}
            )
            none = fused_linear_distill(xs, ws, xt, wt, mask=one & False, **kwargs)
        assert rel(loss - inter_only, torch.tensor(1.3 * 4.0, dtype=F64)) <= 1e-15
        assert torch.isnan(none)
    with kdfast.use_backend("reference"):
        ref = fused_linear_distill(xs, ws, xt, wt, mask=one, **kwargs)
    grads_ref = torch.autograd.grad(ref, (xs, ws, wt))
    grads = torch.autograd.grad(
        fused_linear_distill(xs, ws, xt, wt, mask=one, **kwargs), (xs, ws, wt)
    )
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel(g, g_ref) <= 1e-7


def test_dist_teacher_is_a_constant_unless_it_requires_grad():
    xs, ws, bs, xt, wt, bt, labels, _ = dist_args(teacher_grad=False)
    wt.requires_grad_(True)
    fused_linear_distill(xs, ws, xt, wt, labels=labels, chunk_size=4, **DIST).backward()
    assert wt.grad is not None and xt.grad is None and ws.grad is not None
    with torch.no_grad():
        a = fused_linear_distill(xs, ws, xt, wt, chunk_size=4, **DIST)
    assert not a.requires_grad


def _truth(args):
    """The float64 copy of the (already rounded) inputs, same requires_grad."""
    out = []
    for a in args:
        if a is not None and a.is_floating_point():
            a = a.detach().to(F64).requires_grad_(a.requires_grad)
        out.append(a)
    return out


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_dist_float32_and_bfloat16_close_to_float64_truth(dtype):
    """Semantics 7: within 1e-5 of the float64 truth, or 2x the error of the reference run in
    the same dtype, whichever is larger."""
    args = dist_args(dtype=dtype, tokens=40)
    kwargs = dict(DIST, labels=args[6], mask=args[7], hard_loss_weight=0.5, chunk_size=7)
    loss, grads = run_dist(args, None, **kwargs)
    loss_ref, grads_ref = run_dist(args, "reference", **kwargs)
    loss_truth, grads_truth = run_dist(_truth(args), "reference", **kwargs)
    assert loss.dtype == torch.float32 and grads[1].dtype == dtype
    assert rel(loss, loss_truth) <= max(1e-5, 2 * rel(loss_ref, loss_truth))
    for g, g_ref, g_truth in zip(grads, grads_ref, grads_truth, strict=True):
        assert rel(g, g_truth) <= max(1e-5, 2 * rel(g_ref, g_truth))


@pytest.mark.parametrize("scale", (1e-3, 30.0))
def test_dist_float32_near_uniform_and_peaked(scale):
    """Adversarial float32: probabilities all near 1/V (the column moments are tiny next to
    the means: raw moments would cancel) or peaked, merged over 32 one-row chunks."""
    g = torch.Generator().manual_seed(1)
    shapes = ((32, 8), (100, 8), (32, 8), (100, 8))
    x64 = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    x64[0], x64[2] = x64[0] * scale, x64[2] * scale
    args32 = [x.float().requires_grad_() for x in x64]
    args64 = [x.float().double().requires_grad_() for x in x64]

    def run32(args, backend, chunk):
        with kdfast.use_backend(backend):
            loss = fused_linear_distill(*args, divergence="dist", chunk_size=chunk)
        return loss, torch.autograd.grad(loss, args)

    loss, grads = run32(args32, None, 1)
    loss_ref, grads_ref = run32(args32, "reference", None)
    loss_truth, grads_truth = run32(args64, "reference", None)
    assert rel(loss, loss_truth) <= max(1e-5, 2 * rel(loss_ref, loss_truth))
    for g, g_ref, g_truth in zip(grads, grads_ref, grads_truth, strict=True):
        assert rel(g, g_truth) <= max(1e-5, 2 * rel(g_ref, g_truth))


def test_dist_never_creates_a_tokens_by_vocab_tensor():
    tokens, vocab, chunk = 64, 50, 8
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(tokens, H, generator=g, requires_grad=True)
    ws = torch.randn(vocab, H, generator=g, requires_grad=True)
    xt = torch.randn(tokens, HT, generator=g, requires_grad=True)
    wt = torch.randn(vocab, HT, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    with _Shapes() as mode:
        loss = fused_linear_distill(
            xs, ws, xt, wt, labels=labels, hard_loss_weight=1.0, chunk_size=chunk, **DIST
        )
        loss.backward()
    largest = max(s[0] * s[1] for s in mode.shapes if len(s) == 2 and vocab in s)
    assert largest == chunk * vocab
    assert xt.grad is not None and wt.grad is not None


def test_dist_module():
    xs, ws, bs, xt, wt, bt, labels, mask = make()
    loss_fn = FusedLinearDistillationLoss(
        "dist", temperature=2.0, inter_weight=0.6, intra_weight=1.3, hard_loss_weight=0.3,
        chunk_size=5,
    )  # fmt: skip
    assert "inter_weight=0.6" in repr(loss_fn)
    ours = loss_fn(xs, ws, xt, wt, labels, bs, bt, mask)
    expected = fused_linear_distill(
        xs, ws, xt, wt, student_bias=bs, teacher_bias=bt, labels=labels, mask=mask,
        hard_loss_weight=0.3, chunk_size=3, **DIST,
    )  # fmt: skip
    assert rel(ours, expected) <= 1e-12
    with pytest.raises(ValueError, match="reduction must be 'batchmean'"):
        FusedLinearDistillationLoss("dist", reduction="sum")


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"reduction": "sum"}, ValueError, "reduction must be 'batchmean' with divergence 'dist'"),
        ({"reduction": "none"}, ValueError, "reduction must be 'batchmean' with divergence 'dist'"),
        ({"inter_weight": float("nan")}, ValueError, "inter_weight must be finite"),
        ({"intra_weight": float("inf")}, ValueError, "intra_weight must be finite"),
        ({"inter_weight": True}, TypeError, "inter_weight must be a real number"),
        ({"intra_weight": "1"}, TypeError, "intra_weight must be a real number"),
        ({"intra_weight": torch.tensor(1.0)}, TypeError, "intra_weight must be a real number"),
    ],
)
def test_dist_bad_inputs(overrides, error, message):
    with pytest.raises(error, match=message):
        _call(**{"divergence": "dist", **overrides})


class _LiveBuffers(TorchDispatchMode):
    """The most distinct storages of at least ``size`` elements alive at once among the
    tensors the ops return (views of one buffer count once)."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.alive, self.most = size, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        for o in flat:
            if isinstance(o, torch.Tensor) and o.numel() >= self.size:
                key = o.untyped_storage().data_ptr()
                self.alive.setdefault(key, []).append(weakref.ref(o))
        alive = {k: [r for r in v if r() is not None] for k, v in self.alive.items()}
        self.alive = {k: v for k, v in alive.items() if v}
        self.most = max(self.most, len(self.alive))
        return out


@pytest.mark.parametrize("teacher_grad", (False, True))
@pytest.mark.parametrize("hard", (0.0, 0.5))
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
@pytest.mark.parametrize("divergence", ("jsd", "kl"))
def test_chunk_buffers_bound_the_live_chunk_temporaries(divergence, reduction, hard, teacher_grad):
    """The automatic chunk size divides the budget by chunk_buffers(): no more (chunk, V)
    temporaries are alive at once, forward and backward."""
    from kdfast.fused_linear import chunk_buffers
    from kdfast.reference.fused_linear_distill import DistillOptions

    tokens, vocab, chunk = 24, 300, 8
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(tokens, H, generator=g, requires_grad=True)
    ws = torch.randn(vocab, H, generator=g, requires_grad=True)
    xt = torch.randn(tokens, HT, generator=g, requires_grad=teacher_grad)
    wt = torch.randn(vocab, HT, generator=g, requires_grad=teacher_grad)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    options = DistillOptions(divergence, 0.5, 1.0, reduction, 1.0, hard, -100)
    needs = (True, True, False, teacher_grad, teacher_grad, False)
    kwargs = dict(divergence=divergence, reduction=reduction, hard_loss_weight=hard)
    with _LiveBuffers(chunk * vocab) as mode:
        loss = fused_linear_distill(xs, ws, xt, wt, labels=labels, chunk_size=chunk, **kwargs)
        loss.sum().backward()
    # the bound is tight: the divisor does not waste the budget either
    assert mode.most == chunk_buffers(options, needs)


@pytest.mark.parametrize("divergence", ("jsd", "dist"))
def test_backward_hands_over_the_forward_gradients(divergence):
    """loss.backward() makes the weight gradient computed in the forward pass ws.grad itself,
    not a (V, H) copy of it (at (4096, 2048, 128256) that copy was 1 GB of the peak); with
    retain_graph=True the saved gradients stay, so a second backward is right too."""
    xs, ws, _, xt, wt, *_ = make(dtype=torch.float32, bias=False)
    loss = fused_linear_distill(xs, ws, xt, wt, divergence=divergence)
    computed = loss.grad_fn.grads[1].data_ptr()  # the forward's (V, H) weight gradient
    loss.backward()
    assert ws.grad.data_ptr() == computed
    once = ws.grad.clone()

    ws.grad = None
    loss = fused_linear_distill(xs, ws, xt, wt, divergence=divergence)
    loss.backward(retain_graph=True)
    assert ws.grad.data_ptr() != loss.grad_fn.grads[1].data_ptr()
    loss.backward()
    assert rel(ws.grad, 2 * once) <= 1e-6
