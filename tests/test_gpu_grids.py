"""tools/gpu/grids.py: the record of which tests run each Triton kernel on what grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from tools.gpu import grids


def test_record_keeps_the_largest_grid_per_kernel(monkeypatch):
    monkeypatch.setattr(grids, "_seen", {})
    grids.record("k", (2, 1, 1), "a")
    grids.record("k", (3, 2, 1), "b")
    grids.record("k", (5, 1, 1), "c")  # 5 programs < 6
    grids.record("other", (1, 1, 1), "a")
    rows = {row["kernel"]: row for row in grids.table()}
    assert rows["k"]["tests"] == 3 and rows["k"]["largest_grid"] == [3, 2, 1]
    assert rows["k"]["programs"] == 6 and rows["k"]["largest_by"] == "b"
    assert rows["other"]["tests"] == 1


def test_plugin_records_interpreted_launches(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "grids.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tools.gpu.grids",
         "--grids-json", str(out), "tests/kernels/test_triton_tiles.py",
         "-k", "rkd_distance_pair_tiles"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {row["kernel"]: row for row in json.loads(out.read_text())}
    # the pair-tile test runs both RKD distance kernels on a grid of more than one program
    assert {"pair_forward_kernel", "pair_backward_kernel"} <= set(rows)
    assert rows["pair_forward_kernel"]["programs"] > 1
    assert "Triton kernels executed" in proc.stdout
