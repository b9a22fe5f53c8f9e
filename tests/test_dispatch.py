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


@pytest.fixture
def gpu_only_op(monkeypatch):
    """A toy op with a cuda-backend implementation and a Triton one, the cuda backend
    treated as available, and an empty GPU record."""
    monkeypatch.setitem(
        _dispatch.BACKENDS,
        "cuda",
        _dispatch.Backend(
            "cuda",
            frozenset({"cuda"}),
            _dispatch.HALF_AND_FLOAT,
            None,
            "toy",
            needs_gpu_record=True,
        ),  # fmt: skip
    )
    monkeypatch.setitem(
        _dispatch.BACKENDS,
        "triton",
        _dispatch.Backend("triton", frozenset({"cuda"}), _dispatch.HALF_AND_FLOAT, None, "toy"),
    )
    _dispatch.implement("toy_op", "cuda", lambda x: x)
    _dispatch.implement("toy_op", "triton", lambda x: x)
    _dispatch.implement("toy_op", "reference", lambda x: x)
    monkeypatch.setattr(_dispatch, "gpu_passed", lambda: frozenset())
    yield "toy_op"
    del _dispatch._IMPLS["toy_op"]


def test_gpu_only_implementation_is_opt_in_until_recorded(gpu_only_op, monkeypatch):
    verdicts = dict(_dispatch.explain(gpu_only_op, "cuda", torch.float32))
    assert "not yet run on a GPU" in verdicts["cuda"]
    assert verdicts["triton"] is None  # the interpreter-verified kernel runs instead
    recorded = frozenset({(gpu_only_op, "cuda")})
    monkeypatch.setattr(_dispatch, "gpu_passed", lambda: recorded)
    assert dict(_dispatch.explain(gpu_only_op, "cuda", torch.float32))["cuda"] is None


def test_one_implementation_can_need_a_gpu_record(gpu_only_op, monkeypatch):
    """implement(needs_gpu_record=True): that implementation alone (a new Triton kernel, its
    backend's older ones automatic) is opt-in on CUDA until recorded; forcing runs it."""
    assert not _dispatch.needs_gpu_record(gpu_only_op, "triton")
    _dispatch.implement(gpu_only_op, "triton", lambda x: x, needs_gpu_record=True)
    assert _dispatch.needs_gpu_record(gpu_only_op, "triton")
    verdicts = dict(_dispatch.explain(gpu_only_op, "cuda", torch.float32))
    assert "not yet run on a GPU" in verdicts["triton"]
    forced = _dispatch._rejection(gpu_only_op, "triton", "cuda", (torch.float32,), (), {}, False)
    assert forced is None
    recorded = frozenset({(gpu_only_op, "triton")})
    monkeypatch.setattr(_dispatch, "gpu_passed", lambda: recorded)
    assert dict(_dispatch.explain(gpu_only_op, "cuda", torch.float32))["triton"] is None


def test_gpu_record_file(tmp_path, monkeypatch):
    """A run's "pass" lifts the opt-in; a failure in any run keeps it."""
    import json

    path = tmp_path / "gpu_results.json"
    runs = [
        {"gpu": "H200", "results": {"a/cuda": "pass", "b/cuda": "pass", "c/cuda": "fail"}},
        {"gpu": "H100", "results": {"b/cuda": "fail"}},
    ]
    path.write_text(json.dumps({"runs": runs}))
    monkeypatch.setattr(_dispatch, "GPU_RESULTS", str(path))
    _dispatch.gpu_passed.cache_clear()
    try:
        assert _dispatch.gpu_passed() == {("a", "cuda")}
        path.write_text("not json")
        _dispatch.gpu_passed.cache_clear()
        assert _dispatch.gpu_passed() == frozenset()
    finally:
        _dispatch.gpu_passed.cache_clear()


def test_shipped_gpu_record_is_valid():
    """kdfast/gpu_results.json parses, and each run names what the opt-in rule relies on."""
    import json

    with open(_dispatch.GPU_RESULTS) as f:
        record = json.load(f)
    for run in record["runs"]:
        assert {"commit", "gpu", "driver", "torch", "triton", "results"} <= set(run)
        assert set(run["results"].values()) <= {"pass", "fail"}


def test_info_names_every_gpu_only_implementation():
    from kdfast import info

    lines = "\n".join(info.gpu_record_lines())
    for op in _dispatch.ops():
        for name in _dispatch.implementations(op):
            if _dispatch.needs_gpu_record(op, name):
                assert f"{op}/{name}:" in lines
