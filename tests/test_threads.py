"""Threads: a backend forced with ``use_backend`` holds in its own thread only.

``KDFAST_BACKEND`` and :func:`kdfast.set_backend` stay process-wide.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import kdfast
from kdfast import _dispatch

X = torch.randn(5, 3)


def run_in_thread(fn):
    """Run ``fn()`` in a new thread; return its result (re-raising what it raised)."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_overlapping_with_blocks_in_two_threads_restore_the_automatic_choice():
    """Thread A enters, thread B enters, A exits, B exits: nothing stays forced."""
    a_entered, b_entered, a_exited = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with kdfast.use_backend("reference"):
            a_entered.set()
            assert b_entered.wait(30)
            seen["a inside, b inside"] = _dispatch.forced_backend()
        a_exited.set()
        seen["a after"] = _dispatch.forced_backend()

    def thread_b():
        assert a_entered.wait(30)
        with kdfast.use_backend("cpp"):
            b_entered.set()
            assert a_exited.wait(30)
            seen["b inside, a exited"] = _dispatch.forced_backend()
        seen["b after"] = _dispatch.forced_backend()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == {
        "a inside, b inside": "reference",
        "b inside, a exited": "cpp",
        "a after": None,
        "b after": None,
    }
    assert _dispatch.forced_backend() is None
    assert run_in_thread(_dispatch.forced_backend) is None


def test_a_with_block_does_not_reach_other_threads():
    with kdfast.use_backend("cuda"):  # cannot run on CPU tensors: raises where it applies
        with pytest.raises(RuntimeError, match="'cuda' was forced"):
            _dispatch.select("rkd_distance", X, X)
        other = run_in_thread(lambda: _dispatch.select("rkd_distance", X, X)[0])
        assert other != "cuda"
        assert run_in_thread(_dispatch.forced_backend) is None


def test_a_thread_forces_its_own_backend_for_the_real_ops():
    def forward():
        with kdfast.use_backend("reference"):
            return _dispatch.select("kd_loss", X, X, 1.0, "batchmean", None, "logits")[0]

    assert run_in_thread(forward) == "reference"
    automatic = _dispatch.select("kd_loss", X, X, 1.0, "batchmean", None, "logits")[0]
    assert automatic == _dispatch.select("kd_loss", X, X, 1.0, "batchmean", None, "logits")[0]
    assert _dispatch.forced_backend() is None


def test_set_backend_is_process_wide_and_a_with_block_overrides_it_locally():
    try:
        kdfast.set_backend("reference")
        assert run_in_thread(_dispatch.forced_backend) == "reference"
        with kdfast.use_backend(None):  # automatic in this thread only
            assert _dispatch.forced_backend() is None
            assert run_in_thread(_dispatch.forced_backend) == "reference"
        assert _dispatch.forced_backend() == "reference"
    finally:
        kdfast.set_backend(None)
    assert _dispatch.forced_backend() is None


def test_nested_blocks_restore_in_order():
    with kdfast.use_backend("reference"):
        with kdfast.use_backend("cpp"):
            assert _dispatch.forced_backend() == "cpp"
        assert _dispatch.forced_backend() == "reference"
    assert _dispatch.forced_backend() is None


def test_environment_variable_reaches_every_thread():
    code = (
        "import threading, kdfast, kdfast._dispatch as d\n"
        "out = []\n"
        "t = threading.Thread(target=lambda: out.append(d.forced_backend()))\n"
        "t.start(); t.join()\n"
        "print(d.forced_backend(), out[0])\n"
    )
    env = {**os.environ, "KDFAST_BACKEND": "reference"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["reference", "reference"]
