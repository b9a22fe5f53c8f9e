"""The one dispatch point, the extension loader and ``python -m kdfast.info``."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import NO_EXT

import kdfast
from kdfast import _dispatch


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300
    )


def test_every_op_has_a_reference():
    for op in _dispatch.ops():
        assert "reference" in _dispatch._IMPLS[op], op


def test_automatic_choice_on_cpu():
    x = torch.randn(5, 3)
    # under TRITON_INTERPRET=1 triton runs CPU tensors and comes first in priority order
    interpreted = "cpu" in (_dispatch.BACKENDS["triton"].devices or ())
    expected = "triton" if interpreted else "reference" if NO_EXT else "cpp"
    assert _dispatch.select("rkd_distance", x, x)[0] == expected
    assert _dispatch.select("kd_loss", x, x, 1.0, "batchmean", None, "logits")[0] == expected
    assert _dispatch.select("dist_loss", x, x, 1.0, 1.0, 1.0, True, "softmax", None)[0] == expected


def test_use_backend_forces_and_restores():
    x = torch.randn(5, 3)
    before = _dispatch.forced_backend()
    with kdfast.use_backend("reference"):
        assert _dispatch.select("rkd_distance", x, x)[0] == "reference"
    assert _dispatch.forced_backend() == before


def test_forced_backend_that_cannot_run_lists_reasons():
    x = torch.randn(5, 3)
    with kdfast.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="forced.*cannot run rkd_distance.*All backends"):
            kdfast.functional.rkd_distance(x, x)
    with kdfast.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="no cpp implementation of vkd_loss|KDFAST_NO_EXT"):
            kdfast.functional.vkd_loss(x, x)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown kdfast backend 'cudnn'"):
        kdfast.use_backend("cudnn").__enter__()


def test_device_without_kernels_falls_back_with_one_warning():
    x = torch.empty(4, 3, device="meta")
    _dispatch._warned_devices.discard("meta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _dispatch.select("rkd_distance", x, x)[0] == "reference"
        assert _dispatch.select("rkd_angle", x, x)[0] == "reference"
    messages = [str(w.message) for w in caught if "no kernels for device" in str(w.message)]
    assert len(messages) == 1, messages


def test_capability_data_rejects_dtype_and_limit():
    def fn(x):
        return x

    _dispatch.implement("toy", "cpp", fn, dtypes={torch.float64}, limit=lambda x: "too big")
    _dispatch.implement("toy", "reference", fn)
    try:
        verdicts = dict(_dispatch.explain("toy", "cpu", torch.float32))
        assert verdicts["reference"] is None
        if not NO_EXT:
            assert verdicts["cpp"] == "dtype torch.float32 not supported"
            x = torch.zeros(2, dtype=torch.float64)
            assert (
                dict(_dispatch.explain("toy", "cpu", torch.float64, (x,), {}))["cpp"] == "too big"
            )
    finally:
        del _dispatch._IMPLS["toy"]


def test_environment_variable_forces_backend():
    out = _run(
        "import kdfast, kdfast._dispatch as d; print(d.forced_backend())",
        KDFAST_BACKEND="reference",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    bad = _run(
        "import kdfast, kdfast._dispatch as d; print(d.forced_backend())", KDFAST_BACKEND="x"
    )
    assert bad.returncode == 0 and bad.stdout.strip() == "None"
    assert "KDFAST_BACKEND='x' is not a kdfast backend" in bad.stderr


def test_import_without_extension_falls_back():
    code = (
        "import torch, kdfast\n"
        "from kdfast import _extension, _dispatch\n"
        "print(_extension.unavailable_reason())\n"
        "x = torch.randn(4, 3)\n"
        "print(_dispatch.select('rkd_distance', x, x)[0])\n"
        "print(float(kdfast.functional.rkd_distance(x, x)))\n"
    )
    out = _run(code, KDFAST_NO_EXT="1", TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    reason, backend, loss = out.stdout.split("\n")[:3]
    assert "KDFAST_NO_EXT=1" in reason and backend == "reference" and float(loss) == 0.0


def test_info_reports_build_and_every_op():
    out = _run("import runpy; runpy.run_module('kdfast.info', run_name='__main__')")
    assert out.returncode == 0, out.stderr
    for op in _dispatch.ops():
        assert op in out.stdout
    if NO_EXT:
        assert "C++ extension NOT LOADED" in out.stdout
    else:
        assert "C++ extension kdfast._C: built against torch" in out.stdout


def test_info_table_matches_dispatcher():
    from kdfast.info import backend_table

    for row in backend_table():
        x = torch.zeros(3, 3)
        if row["op"] == "rkd_distance":
            assert row["cpu"] == _dispatch.select("rkd_distance", x, x)[0]
        assert row["cpu"] in _dispatch.PRIORITY and row["cuda"] in _dispatch.PRIORITY


def test_opt_in_implementation_runs_only_when_forced():
    def fast(x):
        return x + 1

    def reference(x):
        return x

    _dispatch.implement("toy_opt_in", "cpp", fast, opt_in="not faster yet")
    _dispatch.implement("toy_opt_in", "reference", reference)
    try:
        x = torch.zeros(2)
        if NO_EXT:
            assert _dispatch.select("toy_opt_in", x)[0] == "reference"
            return
        verdicts = dict(_dispatch.explain("toy_opt_in", "cpu", torch.float32, (x,), {}))
        assert "opt-in only (not faster yet)" in verdicts["cpp"]
        assert _dispatch.call("toy_opt_in", x).sum() == 0
        with kdfast.use_backend("cpp"):
            assert _dispatch.call("toy_opt_in", x).sum() == 2
    finally:
        del _dispatch._IMPLS["toy_opt_in"]
