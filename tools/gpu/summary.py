"""``python -m tools.gpu.summary RUN.json [BENCH.json]``: the one table of
``tools/gpu_check.sh``: pass / fail of the contract suite per op x backend, then per bench
case the kdfast time, its ratio against eager and torch.compile, and the achieved GB/s and
TFLOP/s against the roofline estimate (benchmarks/README.md)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from kdfast.bench import roofline

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}  # fmt: skip


def contract_table(run: dict) -> list[str]:
    results = run["results"]
    ops = sorted({key.split("/")[0] for key in results})
    backends = [b for b in ("reference", "cpp", "triton", "cuda")
                if any(key.endswith("/" + b) for key in results)]  # fmt: skip
    width = max([len(op) for op in ops] + [4]) + 2
    head = f"{'op':<{width}}" + "".join(f"{b:<11}" for b in backends)
    lines = [f"contract suite on {run['device']} ({run.get('gpu') or 'no GPU'}):", head]
    for op in ops:
        cells = [results.get(f"{op}/{b}", "-") for b in backends]
        lines.append(f"{op:<{width}}" + "".join(f"{c:<11}" for c in cells))
    failed = [k for k, v in results.items() if v != "pass"]
    lines.append(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if run.get("complete") is False:
        lines.append("INCOMPLETE: the suite was cut short; the figures cover the tests that ran")
    return lines


def bench_table(bench: dict) -> list[str]:
    meta = bench["metadata"]
    peaks = roofline.gpu_peaks(meta.get("gpu"))
    lines = [
        f"quick bench on {meta['device']} ({meta.get('gpu') or meta.get('cpu')}), roofline "
        f"of {peaks['name']}:",
        f"{'case':<34}{'size':<22}{'kdfast ms':>10}{'x eager':>9}{'x comp':>8}{'GB/s':>9}"
        f"{'TFLOP/s':>9}{'% roof':>8}",
    ]
    for row in bench["rows"]:
        res = row["results"]
        ours = res.get("kdfast", {}).get("median_s")

        def ratio(impl, res=res, ours=ours):
            base = res.get(impl, {}).get("median_s")
            return f"{base / ours:.2f}" if base and ours else "-"

        gbs = tflops = roof = "-"
        dtype = DTYPES.get(row.get("dtype", "float32"), torch.float32)
        if ours and row["case"] in roofline.FORMULAS:
            est = roofline.estimate(row["case"], tuple(row["size"]), dtype, peaks)
            gbs = f"{est.bytes / ours / 1e9:.0f}"
            tflops = f"{(est.mm_flops + est.flops) / ours / 1e12:.2f}"
            roof = f"{est.floor_s / ours:.0%}"
        ms = f"{ours * 1e3:.3f}" if ours else "-"
        lines.append(
            f"{row['title'][:33]:<34}{str(tuple(row['size'])):<22}{ms:>10}"
            f"{ratio('reference'):>9}{ratio('compiled'):>8}{gbs:>9}{tflops:>9}{roof:>8}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu.summary", description=__doc__)
    parser.add_argument("run", help="run record of the contract suite (tools.gpu.results)")
    parser.add_argument("bench", nargs="?", help="JSON of python -m kdfast.bench")
    args = parser.parse_args(argv)
    with open(args.run) as f:
        lines = contract_table(json.load(f))
    if args.bench:
        try:
            with open(args.bench) as f:
                lines += ["", *bench_table(json.load(f))]
        except (OSError, ValueError) as exc:
            lines += ["", f"no bench results ({exc})"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
