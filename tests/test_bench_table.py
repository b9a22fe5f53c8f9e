"""The benchmark summary table (kdfast.bench): ratios, skipped baselines, Markdown form."""

from __future__ import annotations

import json

import pytest

from kdfast.bench.__main__ import COLUMNS, format_table, main
from kdfast.testing import rel_error as rel


def _row(**results):
    return {
        "title": "KDLoss",
        "size": [256, 1000],
        "mode": "forward+backward",
        "results": results,
        "errors": {"loss_error": 2e-8, "grad_error": 3e-7},
    }


ROWS = [
    _row(
        kdfast={
            "backend": "cpp",
            "median_s": 0.002,
            "min_s": 0.0019,
            "max_s": 0.0025,
            "peak_bytes": 2**20,
        },
        reference={"median_s": 0.010, "peak_bytes": 8 * 2**20},
        compiled={"skipped": "predicted OOM (30.0 GB)"},
    )
]


def test_markdown_table_has_a_cell_per_column_and_the_ratios():
    lines = format_table(ROWS, markdown=True).splitlines()
    assert len(lines) == 3
    header, cells = lines[0], [c.strip() for c in lines[2].strip("|").split("|")]
    assert header.count("|") == len(COLUMNS) + 1 and len(cells) == len(COLUMNS)
    named = dict(zip([name for name, _ in COLUMNS], cells, strict=True))
    assert named["backend"] == "cpp" and named["kdfast ms"] == "2.00" and named["spread"] == "30%"
    assert named["x ref"] == "5.00" and named["x comp"] == "skip"
    assert named["kd MB"] == "1" and named["ref MB"] == "8" and named["grad err"] == "3.0e-07"


def test_fixed_width_table_aligns_columns():
    header, rule, line = format_table(ROWS).splitlines()
    assert len(header) == len(rule) == len(line) == sum(width for _, width in COLUMNS)
    assert "5.00" in line and "skip" in line


def test_table_from_an_earlier_runs_json(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"metadata": {}, "suite": "quick", "rows": ROWS}))
    assert main(["--table-from", str(path), "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == format_table(ROWS, markdown=True)


def test_skipped_error_measurement_shows_skip():
    row = {**ROWS[0], "errors": {"skipped": "predicted OOM (37.5 GB)"}}
    cells = [c.strip() for c in format_table([row], markdown=True).splitlines()[2].split("|")]
    named = dict(zip([name for name, _ in COLUMNS], cells[1:-1], strict=True))
    assert named["loss err"] == "skip" and named["grad err"] == "skip"


def test_huge_logit_cases_skip_the_float64_truth(monkeypatch):
    """(8192, 128000) in the full suite: no baseline and no float64 error run on 24 GiB."""
    from kdfast.bench import __main__ as bench

    calls = []
    monkeypatch.setattr(bench, "_ram_bytes", lambda: 24 * 2**30)
    monkeypatch.setattr(bench, "measure_in_subprocess", lambda **job: calls.append(job) or {})
    rows = bench.run("full", ["kd"], ["forward+backward"], ["kdfast", "reference"], 1, "cpu", str)
    assert [row["size"] for row in rows] == [[4096, 32000], [8192, 128000]]
    huge = [job for job in calls if job["size"] == [8192, 128000]]
    assert [job.get("impl") for job in huge] == ["kdfast"]
    assert "skipped" in rows[1]["errors"] and "skipped" in rows[1]["results"]["reference"]
    assert "skipped" not in rows[0]["errors"]


def test_in_process_measures_and_reports_errors_as_rows(tmp_path):
    """--in-process (the cuda default) measures without a subprocess per measurement, and a
    measurement that raises becomes the row's error, as a failed subprocess does."""
    import json

    from kdfast.bench import __main__ as bench
    from kdfast.bench.harness import measure_in_process

    out = tmp_path / "bench.json"
    argv = ["--smoke", "--cases", "kd", "--impls", "kdfast", "reference", "--in-process"]
    assert bench.main([*argv, "--no-plots", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metadata"]["in_process"] is True
    (row,) = result["rows"]
    assert row["results"]["kdfast"]["median_s"] > 0
    assert row["results"]["reference"]["median_s"] > 0
    assert row["errors"]["loss_error"] < 1e-5
    bad = measure_in_process(case="no_such_case", size=[2, 3], impl="kdfast", mode="forward",
                             repeats=1)  # fmt: skip
    assert bad["error"].startswith("KeyError")


def test_conditions_see_other_processes_and_flag_busy_rows(tmp_path):
    """--background-load N spins N processes for the run; every measurement records the
    cores others used, and the row is flagged busy (also in the JSON's conditions)."""
    import json
    import time

    from kdfast.bench import __main__ as bench
    from kdfast.bench.conditions import Window, background_load, is_busy, is_noisy

    with background_load(1), Window() as window:
        time.sleep(0.2)  # let the spinner start
        with Window() as inner:
            time.sleep(0.4)
    conditions = inner.result()
    assert conditions["others_cores"] >= 0.5 and conditions["cpu_per_wall"] < 0.2
    assert is_busy(conditions) and window.result()["others_cores"] > 0
    assert is_busy({"others_cores": 0.0, "load_before": 100.0}, cores=2)
    assert not is_busy({"others_cores": 0.1, "load_before": 0.5, "load_after": 0.4}, cores=2)
    assert is_noisy({"min_s": 1.0, "median_s": 1.0, "max_s": 2.5})
    assert not is_noisy({"min_s": 1.0, "median_s": 1.1, "max_s": 1.3})

    out = tmp_path / "bench.json"
    argv = ["--smoke", "--cases", "kd", "--impls", "kdfast", "--background-load", "1"]
    assert bench.main([*argv, "--no-plots", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metadata"]["background_load"] == 1
    (row,) = result["rows"]
    assert row["results"]["kdfast"]["conditions"]["others_cores"] >= 0.5
    assert "busy" in bench.row_flags(row)
    assert bench.table_cells(row)[-1].startswith("busy")


def test_fused_linear_baselines_compute_the_same_loss_and_are_measured(tmp_path, monkeypatch):
    """The fused linear-head cases' baselines: Liger-Kernel's LigerFusedLinearJSDLoss gives
    kdfast's loss and student gradients on the case's inputs, within float32's tolerance
    (Liger computes in float32 whatever the inputs: like is compared with like),
    the four-GEMM floor runs, both land in the table's baselines cell with their ratio and
    memory; a baseline whose library is missing is reported skipped."""
    import torch

    from kdfast.bench import __main__ as bench
    from kdfast.bench.cases import BY_NAME, Case

    case = BY_NAME["fused_linear_jsd"]
    assert set(case.baselines) == {"liger", "gemms"}
    pytest.importorskip("liger_kernel")  # CI installs it (.ci/run); the bench extra has it
    size = case.sizes["smoke"][0]
    results = []
    for make in (case.setup, case.baselines["liger"]):
        forward, params = make(size, "cpu", torch.float32)
        loss = forward()
        results.append((loss.detach(), *torch.autograd.grad(loss, params)))
    for got, want in zip(*results, strict=True):
        assert rel(got, want) <= 1e-5

    out = tmp_path / "bench.json"
    argv = ["--smoke", "--cases", "fused_linear_jsd", "--impls", "kdfast", "liger", "gemms"]
    assert bench.main([*argv, "--in-process", "--no-plots", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    for name in ("kdfast", "liger", "gemms"):
        assert row["results"][name]["median_s"] > 0, row["results"][name]
    cell = bench.baseline_cell(row)
    assert cell.startswith("liger x") and ", gemms x" in cell

    def missing(size, device, dtype):
        raise ImportError("No module named 'liger_kernel'")

    broken = Case(**{**case.__dict__, "baselines": {"liger": missing}})
    monkeypatch.setitem(BY_NAME, "fused_linear_jsd", broken)
    skipped = bench.measure_in_process(case="fused_linear_jsd", size=list(size), impl="liger",
                                       mode="forward", repeats=1)  # fmt: skip
    assert skipped["skipped"].startswith("not installed")
    assert bench.baseline_cell({"results": {"kdfast": {}, "liger": skipped}}) == "liger skip"
