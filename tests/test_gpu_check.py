"""The GPU check's own pieces (tools/gpu): the run record, its summary, and recording only
real GPU runs. The whole script runs in CI as ``tools/gpu_check.sh --dry-run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.gpu import record, summary  # noqa: E402
from tools.gpu.results import run_record  # noqa: E402


def _run(device="cuda", gpu="NVIDIA H200"):
    """A record as a run on ``device`` writes it (made on the CPU, then relabelled)."""
    run = run_record("cpu", {"rkd_angle/cuda": "pass", "rkd_angle/triton": "fail"})
    run.update(device=device, gpu=gpu if device == "cuda" else None)
    return run


def test_run_record_names_versions_and_results():
    run = _run("cpu")
    assert {"commit", "gpu", "driver", "torch", "triton", "results", "date"} <= set(run)
    assert run["results"]["rkd_angle/triton"] == "fail"


def test_summary_table_lists_each_op_and_backend(capsys):
    lines = summary.contract_table(_run())
    assert any(line.split()[:3] == ["rkd_angle", "fail", "pass"] for line in lines), lines
    assert lines[-1] == "1 passed, 1 failed"


def test_record_appends_gpu_runs_and_refuses_dry_runs(tmp_path):
    into = tmp_path / "gpu_results.json"
    into.write_text(json.dumps({"runs": []}))
    for device, expected in (("cpu", 1), ("cuda", 0)):
        path = tmp_path / f"{device}.json"
        path.write_text(json.dumps(_run(device)))
        assert record.main([str(path), "--into", str(into)]) == expected
    runs = json.loads(into.read_text())["runs"]
    assert [r["device"] for r in runs] == ["cuda"]
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps({**_run("cuda"), "complete": False}))
    assert record.main([str(cut), "--into", str(into)]) == 1
    assert len(json.loads(into.read_text())["runs"]) == 1
    assert summary.contract_table(json.loads(cut.read_text()))[-1].startswith("INCOMPLETE")


def test_bench_table_reports_roofline_share(tmp_path):
    bench = {
        "metadata": {"device": "cuda", "gpu": "NVIDIA H200", "cpu": "x"},
        "rows": [
            {
                "case": "kd",
                "title": "KD",
                "size": [1024, 32000],
                "results": {"kdfast": {"median_s": 1e-3}, "reference": {"median_s": 4e-3}},
            }
        ],
    }
    lines = summary.bench_table(bench)
    assert "H200" in lines[0]
    cells = lines[-1].split()
    assert cells[-6:-4] == ["1.000", "4.00"]  # kdfast ms, x eager
    assert cells[-1].endswith("%")


def test_gpu_check_keeps_its_budget_and_the_device_tools_file_limit(tmp_path):
    """With its budget spent, every stage says so instead of running, the check fails, and
    $OUT never holds more than the 8 files the device tool brings back."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_BUDGET": "1", "KDFAST_COMMIT": "c0ffee"}
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:]
    assert "contract: not run, the budget of 1s is spent" in done.stdout
    assert "bench: not run" in done.stdout
    assert "commit c0ffee" in done.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
