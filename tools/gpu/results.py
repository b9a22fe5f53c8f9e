"""Pytest plugin of ``tools/gpu_check.sh``: the contract suite's outcome per op x backend.

``python -m pytest tests/contract -p tools.gpu.results --gpu-results FILE --gpu-device cuda``
writes one run record (``kdfast/gpu_results.json``'s format): the commit, GPU, driver,
torch and Triton versions, and ``results`` {"<op>/<backend>": "pass" | "fail"} over the
tests that ran on that device. An implementation passes when every one of its tests that
ran passed (skips, which an implementation declares, do not count).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import subprocess

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--gpu-results", default=None, help="write the run record here")
    parser.addoption("--gpu-device", default="cuda", help="the device whose tests count")


_outcomes: dict[str, set[str]] = {}
_config = None


def pytest_configure(config):
    global _config
    _config = config


def pytest_runtest_logreport(report):
    params = getattr(report, "_kdfast_params", None)
    if params is None or report.skipped:
        return
    if report.when == "call" or report.failed:
        _outcomes.setdefault(params, set()).add("pass" if report.passed else "fail")
        _write(_config, complete=False)  # after every test: a run cut short keeps its results


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    callspec = getattr(item, "callspec", None)
    device = item.config.getoption("--gpu-device")
    if callspec is not None and callspec.params.get("device") == device:
        report._kdfast_params = f"{callspec.params['op']}/{callspec.params['backend']}"


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def _environment(device: str) -> tuple[tuple[str, object], ...]:
    """What ran where (read once per run: the record is rewritten after every test)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    # the device machine receives a copy of the working tree without .git: the caller names
    # the commit in KDFAST_COMMIT
    commit = os.environ.get("KDFAST_COMMIT") or _run(["git", "rev-parse", "HEAD"]) or "unknown"
    return (
        ("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        ("commit", commit),
        ("device", device),
        ("gpu", gpu),
        ("driver", driver.splitlines()[0] if device == "cuda" and driver else None),
        ("torch", torch.__version__),
        ("cuda", torch.version.cuda),
        ("triton", triton_version),
    )


def run_record(device: str, results: dict[str, str]) -> dict:
    """The record of one run: what ran where, and the per-implementation outcome."""
    return {**dict(_environment(device)), "results": results}


def _write(config, complete: bool) -> None:
    path = config.getoption("--gpu-results") if config is not None else None
    if path is None or hasattr(config, "workerinput"):
        return
    results = {
        key: "fail" if "fail" in outcomes else "pass" for key, outcomes in sorted(_outcomes.items())
    }
    record = run_record(config.getoption("--gpu-device"), results)
    record["complete"] = complete
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def pytest_sessionfinish(session, exitstatus):
    _write(session.config, complete=True)
