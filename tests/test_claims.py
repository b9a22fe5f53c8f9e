"""examples/claims.py: each method's own claim in its home setting (reduced --quick runs)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import example_main

ARMS = {
    "rkd": {"teacher", "triplet", "rkd"},
    "vkd": {"ce", "linear", "orthogonal"},
    "dist": {"no_kd", "kd@1", "dist@1", "kd@2", "dist@2"},
    "deit": {"none", "soft", "hard", "soft_a05"},
    "ssd_kd": {"prioritized", "uniform"},
}


@pytest.mark.parametrize("claim", sorted(ARMS))
def test_claim_quick_runs_and_reports(claim, tmp_path, capsys):
    main = example_main("claims.py")
    report = main(["--claim", claim, "--quick", "--out-dir", str(tmp_path)])[claim]
    out = capsys.readouterr().out
    assert "verdict:" in out
    saved = json.loads((tmp_path / f"claim_{claim}_results.json").read_text())
    assert (tmp_path / f"claim_{claim}_results.png").stat().st_size > 0
    assert set(saved["table"]) == ARMS[claim] == set(report["runs"])
    assert saved["verdict"].split(":")[0] in ("reproduced at small scale", "not reproduced")
    for runs in report["runs"].values():
        assert [r["seed"] for r in runs] == [0, 1]
    for ci in report["comparisons"].values():  # paired differences with 95% t-intervals
        assert ci["n"] == 2 and math.isfinite(ci["mean"]) and ci["half"] >= 0


def test_mean_ci_is_the_t_interval():
    mean_ci = example_main("claims.py").__globals__["mean_ci"]
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # t_{0.975, 4} = 2.776445; s = sqrt(2.5)
    assert ci["mean"] == 3.0 and ci["half"] == pytest.approx(2.776445 * math.sqrt(2.5 / 5))
