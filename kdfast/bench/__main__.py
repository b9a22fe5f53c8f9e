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

import torch

import kdfast
from kdfast.bench.cases import CASES
from kdfast.bench.harness import IMPLEMENTATIONS, MODES, measure_in_subprocess
from kdfast.bench.plot import plot

RAM_FRACTION = 0.6


def _ram_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _commit() -> str:
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


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'case':<36}{'size':<22}{'mode':<17}{'backend':<10}{'kdfast ms':>10}{'ref ms':>10}"
        f"{'x ref':>7}{'comp ms':>10}{'x comp':>7}{'kd MB':>7}{'ref MB':>8}{'comp MB':>8}"
        f"{'loss err':>10}{'grad err':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        res = r["results"]

        def get(impl, key, res=res):
            return res.get(impl, {}).get(key)

        def ratio(impl, res=res):
            base, ours = get(impl, "median_s"), get("kdfast", "median_s")
            if base is None:
                return "skip" if "skipped" in res.get(impl, {}) else "-"
            return f"{base / ours:.2f}" if ours else "-"

        err = r.get("errors", {})
        loss_err, grad_err = (
            err.get("loss_error", float("nan")),
            err.get("grad_error", float("nan")),
        )
        lines.append(
            f"{r['title']:<36}{str(tuple(r['size'])):<22}{r['mode']:<17}"
            f"{str(get('kdfast', 'backend')):<10}{_ms(get('kdfast', 'median_s')):>10}"
            f"{_ms(get('reference', 'median_s')):>10}{ratio('reference'):>7}"
            f"{_ms(get('compiled', 'median_s')):>10}{ratio('compiled'):>7}"
            f"{_mb(get('kdfast', 'peak_bytes')):>7}{_mb(get('reference', 'peak_bytes')):>8}"
            f"{_mb(get('compiled', 'peak_bytes')):>8}"
            f"{loss_err:>10.1e}{grad_err:>10.1e}"
        )
    return "\n".join(lines)


def run(suite, case_names, modes, impls, repeats, device, log=print) -> list[dict]:
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
            if impl != "kdfast" and predicted > RAM_FRACTION * _ram_bytes():
                row["results"][impl] = {"skipped": f"predicted OOM ({predicted / 2**30:.1f} GB)"}
                continue
            row["results"][impl] = measure_in_subprocess(
                case=case.name,
                size=list(size),
                impl=impl,
                mode=mode,
                repeats=repeats,
                device=device,
            )
        if mode == modes[0]:
            truth = "reference" if predicted <= RAM_FRACTION * _ram_bytes() else "kdfast"
            row["errors"] = measure_in_subprocess(
                what="errors", case=case.name, size=list(size), device=device, truth=truth
            )
        rows.append(row)
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
        "--impls", nargs="*", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="bench-results/results.json", help="output JSON path")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    args = parser.parse_args(argv)
    suite_name = args.suite or "quick"
    repeats = args.repeats or (1 if suite_name == "smoke" else 5)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    meta = metadata(args.device)
    log(
        f"kdfast {meta['kdfast']} ({meta['commit']}), torch {meta['torch']}, {args.device}, "
        f"{meta['cores']} cores, {meta['ram_gib']} GiB; suite {suite_name}, median of {repeats}"
    )
    sizes = {"smoke": "smoke", "quick": "quick", "full": "full"}[suite_name]
    names = set(args.cases)
    unknown = names - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {[c.name for c in CASES]}")
    suites = ["quick", "full"] if sizes == "full" else [sizes]
    rows = []
    for s in suites:
        rows += run(s, names, args.modes, args.impls, repeats, args.device, log)
    table = format_table(rows)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"metadata": meta, "suite": suite_name, "rows": rows}, f, indent=1)
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
