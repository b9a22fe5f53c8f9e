"""PNG plots of a benchmark run: time and peak memory against problem size, per case.

Needs matplotlib (the ``bench`` extra); without it the suite still writes its table and
JSON and says that the plots were skipped.
"""

from __future__ import annotations

import math
import os


def _size_label(size: list[int]) -> str:
    return "x".join(str(s) for s in size)


def plot(rows: list[dict], out_dir: str, title: str = "") -> list[str]:
    """Write one PNG per case (time and memory panels); return the file paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    cases = sorted({r["case"] for r in rows})
    for case in cases:
        case_rows = [r for r in rows if r["case"] == case and r["mode"] == "forward+backward"]
        if not case_rows:
            case_rows = [r for r in rows if r["case"] == case]
        case_rows.sort(key=lambda r: math.prod(r["size"]))
        labels = [_size_label(r["size"]) for r in case_rows]
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
        for impl in ("kdfast", "reference", "compiled"):
            for ax, key, scale in ((ax_time, "median_s", 1e3), (ax_mem, "peak_bytes", 2**-20)):
                xs, ys = [], []
                for i, r in enumerate(case_rows):
                    value = r["results"].get(impl, {}).get(key)
                    if value is not None:
                        xs.append(i)
                        ys.append(max(value * scale, 1e-3))
                if xs:
                    ax.plot(xs, ys, marker="o", label=impl)
        for ax, ylabel in ((ax_time, "median time (ms)"), (ax_mem, "peak memory increase (MiB)")):
            ax.set_xticks(range(len(labels)), labels, rotation=20)
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_xlabel(case_rows[0]["title"])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"{case_rows[0]['title']}: forward+backward {title}".strip())
        fig.tight_layout()
        path = os.path.join(out_dir, f"{case}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
