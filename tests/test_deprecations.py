"""Deprecated keyword aliases: the old keyword keeps working with a FutureWarning that names
the new one; passing both is a TypeError."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from kdfast import functional as KF
from kdfast._deprecation import renamed_keywords
from kdfast.losses import DeiTDistillationLoss, DISTLoss, KDLoss


@renamed_keywords(old="new", kind=("kind_name", lambda v: isinstance(v, str)))
def _target(x, new=1, kind_name="a", kind=None):
    return x, new, kind_name, kind


def test_helper_renames_with_a_future_warning():
    with pytest.warns(
        FutureWarning, match=r"_target\(\): the keyword old= is deprecated, use new="
    ):
        assert _target(0, old=5) == (0, 5, "a", None)


def test_helper_without_the_old_keyword_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _target(0, new=2) == (0, 2, "a", None)
        assert _target(0, 3) == (0, 3, "a", None)


def test_helper_rejects_both_keywords():
    with pytest.raises(TypeError, match="both new= and its deprecated alias old="):
        _target(0, old=1, new=2)


def test_helper_conditional_alias_only_for_accepted_values():
    with pytest.warns(FutureWarning, match="use kind_name="):
        assert _target(0, kind="b") == (0, 1, "b", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _target(0, kind=7) == (0, 1, "a", 7)  # not a str: passed on as it is


def test_helper_keeps_the_signature():
    import inspect

    assert list(inspect.signature(_target).parameters) == ["x", "new", "kind_name", "kind"]


def _logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)


def test_dist_loss_tau_aliases():
    s, t = _logits()
    want = KF.dist_loss(s, t, temperature=2.0, temperature_squared=False)
    with pytest.warns(FutureWarning, match="use temperature="):
        got = KF.dist_loss(s, t, tau=2.0, temperature_squared=False)
    assert torch.equal(got, want)
    with pytest.warns(FutureWarning, match="use temperature_squared="):
        got = KF.dist_loss(s, t, temperature=2.0, tau_squared=False)
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="temperature= and its deprecated alias tau="):
        KF.dist_loss(s, t, tau=2.0, temperature=2.0)
    with pytest.raises(TypeError):  # the new one given by position
        with pytest.warns(FutureWarning):
            KF.dist_loss(s, t, 1.0, 1.0, 2.0, tau=2.0)


def test_dist_module_tau_aliases():
    with pytest.warns(FutureWarning) as record:
        loss = DISTLoss(tau=4.0, tau_squared=False)
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "DISTLoss(): the keyword tau= is deprecated, use temperature= instead",
        "DISTLoss(): the keyword tau_squared= is deprecated, use temperature_squared= instead",
    ]
    assert loss.temperature == 4.0 and loss.temperature_squared is False
    assert loss.tau == 4.0 and loss.tau_squared is False  # old attributes stay readable
    with pytest.raises(TypeError, match="both temperature_squared="):
        DISTLoss(tau_squared=True, temperature_squared=True)


def test_kd_teacher_kind_alias():
    s, t = _logits()
    probs = torch.softmax(t / 2.0, dim=1)
    want = KF.kd_loss(s, probs, 2.0, teacher_kind="probs")
    with pytest.warns(FutureWarning, match="use teacher_kind="):
        got = KF.kd_loss(s, probs, 2.0, teacher="probs")
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="teacher_kind= and its deprecated alias teacher="):
        KF.kd_loss(s, probs, teacher="probs", teacher_kind="probs")
    with pytest.warns(FutureWarning, match=r"KDLoss\(\): the keyword teacher="):
        module = KDLoss(2.0, teacher="log_probs")
    assert module.teacher_kind == "log_probs" and module.teacher == "log_probs"


def test_deit_tau_alias():
    with pytest.warns(FutureWarning, match=r"DeiTDistillationLoss\(\): the keyword tau="):
        loss = DeiTDistillationLoss(F.cross_entropy, None, "soft", tau=3.0)
    assert loss.temperature == 3.0 and loss.tau == 3.0
    # DeiT's teacher is a model, not a kind: never renamed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DeiTDistillationLoss(F.cross_entropy, teacher=None).teacher is None
