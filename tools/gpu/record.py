"""``python -m tools.gpu.record RUN.json``: append a GPU run record (written by
``tools/gpu_check.sh``) to ``kdfast/gpu_results.json``, which lifts the opt-in of every
GPU-only implementation the run passed. Dry runs (not on a GPU) and runs cut short are
refused."""

from __future__ import annotations

import argparse
import json
import sys

from kdfast import _dispatch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu.record", description=__doc__)
    parser.add_argument("run", help="the run record of tools/gpu_check.sh (gpu_run.json)")
    parser.add_argument("--into", default=_dispatch.GPU_RESULTS)
    args = parser.parse_args(argv)
    with open(args.run) as f:
        run = json.load(f)
    if run.get("device") != "cuda" or not run.get("gpu"):
        print(f"{args.run} is not a GPU run (device {run.get('device')!r}): not recorded")
        return 1
    if run.get("complete") is False:
        print(f"{args.run} is incomplete (the suite was cut short): not recorded")
        return 1
    with open(args.into) as f:
        record = json.load(f)
    record["runs"].append(run)
    with open(args.into, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    passed = sorted(k for k, v in run["results"].items() if v == "pass")
    failed = sorted(k for k, v in run["results"].items() if v != "pass")
    print(f"recorded {run['gpu']} at {run['commit'][:10]}: {len(passed)} passed, {failed=}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
