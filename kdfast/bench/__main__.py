"""``python -m kdfast.bench``: time and memory of every kdfast loss against its baselines.

For each case and size, in the same run: kdfast (the dispatcher's backend), the eager
reference (the official formula) and ``torch.compile`` of the reference. Reports the
median time, the reference/kdfast and compiled/kdfast speed ratios, peak memory and
kdfast's error against a float64 computation; writes JSON with full metadata.
Each measurement runs in a fresh process. Baselines predicted to need more than 60% of
RAM are skipped and reported as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

import kdfast
from kdfast.bench.cases import CASES
from kdfast.bench.conditions import background_load, is_busy, is_noisy, load_average
from kdfast.bench.harness import (
    BASELINES,
    FAST_REPEATS,
    FAST_RUN_S,
    IMPLEMENTATIONS,
    MODES,
    measure_in_process,
    measure_in_subprocess,
)
from kdfast.bench.plot import plot

RAM_FRACTION = 0.6


def _ram_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _commit() -> str:
    """The checkout's commit; KDFAST_COMMIT names it where the tree is a copy without .git."""
    if os.environ.get("KDFAST_COMMIT"):
        return os.environ["KDFAST_COMMIT"][:7]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(kdfast.__file__)),
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def metadata(device: str) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kdfast": kdfast.__version__,
        "commit": _commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "ram_gib": round(_ram_bytes() / (1 << 30), 1),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "build": kdfast._extension.build_info(),
    }


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _mb(nbytes):
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


COLUMNS = (
    ("case", 36), ("size", 22), ("mode", 17), ("backend", 10), ("kdfast ms", 10),
    ("spread", 8), ("ref ms", 10), ("x ref", 7), ("comp ms", 10), ("x comp", 7), ("kd MB", 7),
    ("ref MB", 8), ("comp MB", 8), ("loss err", 10), ("grad err", 10),
    ("baselines (x time, MB)", 36), ("flags", 12),
)  # fmt: skip


def row_flags(row: dict) -> list[str]:
    """ "busy" when any measurement of the row ran on a busy machine (other processes over
    BUSY_OTHERS_CORES cores, or load above the cores), "noisy" when kdfast's spread is over
    NOISY_SPREAD: timings so flagged are unreliable."""
    results = [r for r in row["results"].values() if "median_s" in r]
    flags = []
    if any(is_busy(r.get("conditions", {})) for r in results):
        flags.append("busy")
    if is_noisy(row["results"].get("kdfast", {})):
        flags.append("noisy")
    return flags


def table_cells(row: dict) -> list[str]:
    """One result row as the cells of :data:`COLUMNS` (times in ms, memory in MB)."""
    res = row["results"]

    def get(impl, key):
        return res.get(impl, {}).get(key)

    def ratio(impl):
        base, ours = get(impl, "median_s"), get("kdfast", "median_s")
        if base is None:
            return "skip" if "skipped" in res.get(impl, {}) else "-"
        return f"{base / ours:.2f}" if ours else "-"

    def spread(impl):  # (max - min) / median of the timed runs
        low, high, mid = (get(impl, key) for key in ("min_s", "max_s", "median_s"))
        return "-" if mid is None or low is None or high is None else f"{(high - low) / mid:.0%}"

    err = row.get("errors", {})
    return [
        row["title"],
        str(tuple(row["size"])),
        row["mode"],
        str(get("kdfast", "backend")),
        _ms(get("kdfast", "median_s")),
        spread("kdfast"),
        _ms(get("reference", "median_s")),
        ratio("reference"),
        _ms(get("compiled", "median_s")),
        ratio("compiled"),
        _mb(get("kdfast", "peak_bytes")),
        _mb(get("reference", "peak_bytes")),
        _mb(get("compiled", "peak_bytes")),
        *(
            "skip" if "skipped" in err else f"{err.get(key, float('nan')):.1e}"
            for key in ("loss_error", "grad_error")
        ),
        baseline_cell(row),
        ",".join(row_flags(row)) or "-",
    ]


def baseline_cell(row: dict) -> str:
    """The case's further baselines: ``name xR MB`` (R = baseline time / kdfast's, as the
    other ratio columns), or why it was skipped."""
    ours = row["results"].get("kdfast", {}).get("median_s")
    cells = []
    for name in BASELINES:
        result = row["results"].get(name)
        if result is None:
            continue
        if "median_s" not in result:
            cells.append(f"{name} skip" if "skipped" in result else f"{name} -")
            continue
        ratio = f"x{result['median_s'] / ours:.2f}" if ours else "-"
        cells.append(f"{name} {ratio} {_mb(result.get('peak_bytes'))}")
    return ", ".join(cells) or "-"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The summary table: fixed-width text, or a Markdown table (``--markdown``)."""
    if markdown:
        lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |"]
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
        return "\n".join(lines)

    def fixed(cells):
        return "".join(
            f"{cell:<{width}}" if i < 4 else f"{cell:>{width}}"
            for i, (cell, (_, width)) in enumerate(zip(cells, COLUMNS, strict=True))
        )

    head = fixed([name for name, _ in COLUMNS])
    return "\n".join([head, "-" * len(head), *(fixed(table_cells(r)) for r in rows)])


def run(
    suite, case_names, modes, impls, repeats, device, log=print, on_row=None, in_process=False
) -> list[dict]:
    """Measure every (case, size, mode) of ``suite``; ``on_row(row)`` after each one. Each
    measurement runs in a fresh process, or in this one with ``in_process``."""
    measure_job = measure_in_process if in_process else measure_in_subprocess
    jobs = [
        (case, size, mode)
        for case in CASES
        if not case_names or case.name in case_names
        for size in case.sizes[suite]
        for mode in modes
    ]
    rows = []
    for index, (case, size, mode) in enumerate(jobs, 1):
        row = {"case": case.name, "title": case.title, "size": list(size), "mode": mode}
        row["results"] = {}
        predicted = case.reference_bytes(size)
        for impl in impls:
            if impl in BASELINES and impl not in case.baselines:
                continue
            if impl in ("reference", "compiled") and predicted > RAM_FRACTION * _ram_bytes():
                row["results"][impl] = {"skipped": f"predicted OOM ({predicted / 2**30:.1f} GB)"}
                continue
            row["results"][impl] = measure_job(
                case=case.name,
                size=list(size),
                impl=impl,
                mode=mode,
                repeats=repeats,
                device=device,
            )
        if mode == modes[0]:
            truth = "reference" if predicted <= RAM_FRACTION * _ram_bytes() else "kdfast"
            truth_bytes = case.truth_bytes(size)
            if truth == "kdfast" and truth_bytes > RAM_FRACTION * _ram_bytes():
                row["errors"] = {"skipped": f"predicted OOM ({truth_bytes / 2**30:.1f} GB)"}
            else:
                row["errors"] = measure_job(
                    what="errors", case=case.name, size=list(size), device=device, truth=truth
                )
        rows.append(row)
        if on_row is not None:
            on_row(row)
        summary = ", ".join(
            f"{impl} {_ms(v.get('median_s'))} ms" if "median_s" in v else f"{impl} {v}"
            for impl, v in row["results"].items()
        )
        log(f"[{index}/{len(jobs)}] {case.title} {size} {mode}: {summary}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdfast.bench", description=__doc__)
    suite = parser.add_mutually_exclusive_group()
    suite.add_argument(
        "--smoke",
        action="store_const",
        dest="suite",
        const="smoke",
        help="tiny sizes, one repeat: checks the suite runs (seconds)",
    )
    suite.add_argument(
        "--quick",
        action="store_const",
        dest="suite",
        const="quick",
        help="realistic sizes that finish in minutes on a 2-core CPU (default)",
    )
    suite.add_argument(
        "--full",
        action="store_const",
        dest="suite",
        const="full",
        help="quick sizes plus the large ones (for GPUs and patient CPUs)",
    )
    parser.add_argument("--cases", nargs="*", default=[], help="case names (default: all)")
    parser.add_argument("--modes", nargs="*", default=["forward+backward"], choices=MODES)
    parser.add_argument(
        "--impls",
        nargs="*",
        default=[*IMPLEMENTATIONS, *BASELINES],
        choices=[*IMPLEMENTATIONS, *BASELINES],
        help="what to measure; the baselines only where a case declares them (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="run N processes spinning on a core each for the duration (a reproducibly busy "
        "machine; the table flags its measurements 'busy')",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="bench-results/results.json", help="output JSON path")
    parser.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure in this process (default on cuda; on CPU a fresh process per "
        "measurement keeps the peak-memory figures apart)",
    )
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument(
        "--markdown", action="store_true", help="print the summary table as Markdown"
    )
    parser.add_argument(
        "--table-from",
        metavar="JSON",
        help="print the summary table of an earlier run's JSON and exit (nothing is measured)",
    )
    args = parser.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            print(format_table(json.load(f)["rows"], markdown=args.markdown))
        return 0
    suite_name = args.suite or "quick"
    repeats = args.repeats or (1 if suite_name == "smoke" else 5)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    meta = metadata(args.device)
    in_process = args.device == "cuda" if args.in_process is None else args.in_process
    meta["in_process"] = in_process
    meta["background_load"] = args.background_load
    meta["load_at_start"] = load_average()
    log(
        f"kdfast {meta['kdfast']} ({meta['commit']}), torch {meta['torch']}, {args.device}, "
        f"{meta['cores']} cores, {meta['ram_gib']} GiB; suite {suite_name}, median of {repeats} "
        f"(up to {FAST_REPEATS} for runs under {FAST_RUN_S * 1e3:.0f} ms), "
        + ("in this process" if in_process else "a fresh process per measurement")
    )
    sizes = {"smoke": "smoke", "quick": "quick", "full": "full"}[suite_name]
    names = set(args.cases)
    unknown = names - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {[c.name for c in CASES]}")
    suites = ["quick", "full"] if sizes == "full" else [sizes]
    rows = []
    started = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    def save(row=None):  # after every measurement, so a run cut short keeps what it measured
        if row is not None:
            rows.append(row)
        with open(args.json, "w") as f:
            json.dump({"metadata": meta, "suite": suite_name, "rows": rows}, f, indent=1)

    load, cores = meta["load_at_start"], meta["cores"] or 1
    if args.background_load:
        log(f"background load: {args.background_load} spinning processes for the whole run")
    elif load is not None and load > cores:
        log(f"WARNING: the load average is {load:.1f} on {cores} cores: other work is running, "
            "and timings taken now are unreliable (the table flags them 'busy')")  # fmt: skip
    with background_load(args.background_load):
        for s in suites:
            run(s, names, args.modes, args.impls, repeats, args.device, log, save, in_process)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    print(format_table(rows, markdown=args.markdown))
    log(f"suite {suite_name}: {len(rows)} measurements in {meta['wall_s']:.0f} s wall time")
    flagged = {f: sum(f in row_flags(r) for r in rows) for f in ("busy", "noisy")}
    if flagged["busy"]:
        log(f"WARNING: {flagged['busy']} of {len(rows)} rows were measured while other "
            "processes used more than half a core: their timings are unreliable")  # fmt: skip
    if flagged["noisy"]:
        log(f"{flagged['noisy']} of {len(rows)} rows have a kdfast spread over 100%: rerun "
            "them with more --repeats on a quiet machine")  # fmt: skip
    save()
    log(f"wrote {args.json}")
    if args.plots:
        try:
            paths = plot(rows, os.path.dirname(os.path.abspath(args.json)), args.device)
            log("wrote plots: " + ", ".join(paths))
        except ImportError:
            log("matplotlib is not installed: plots skipped (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
