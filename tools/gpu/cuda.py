"""The CUDA sources (``csrc/cuda/*.cu``) compiled to cubins with ``nvcc -Xptxas -v`` for the
AOT targets, with the build's flags: per-kernel resources, without a GPU.

Spill budgets are ``CUDA_SPILL_BUDGETS`` (0 bytes for a kernel not listed);
``tests/test_gpu_report.py`` checks them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from tools.gpu.ptx import Resources, parse_ptxas_log

CUDA_SPILL_BUDGETS: dict[str, tuple[int, str]] = {}
"""CUDA kernel name (unqualified) -> (spill bytes allowed, why). Absent: 0 bytes."""


def repo_root() -> str | None:
    """The source checkout around this folder (has csrc/cuda/), or None."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.isdir(os.path.join(root, "csrc", "cuda")) else None


def cuda_sources() -> list[str]:
    """csrc/cuda/*.cu of the source checkout (empty when not a checkout)."""
    root = repo_root()
    if root is None:
        return []
    folder = os.path.join(root, "csrc", "cuda")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".cu"))


def nvcc() -> str | None:
    """The nvcc the build would use (CUDA_HOME/bin/nvcc, else PATH), or None."""
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _pip_cuda_include_dirs() -> list[str]:
    """As setup.py's pip_cuda_include_dirs: headers of torch's pip CUDA libraries."""
    import glob

    try:
        import nvidia
    except ImportError:
        return []
    dirs: list[str] = []
    for root in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    return [d for d in dirs if glob.glob(os.path.join(d, "cusparse*.h"))]


def nvcc_command(source: str, arch: int, output: str) -> list[str]:
    """nvcc device-only compile of one .cu to a cubin, with the build's flags."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths(device_type="cuda") + _pip_cuda_include_dirs()
    root = repo_root() or os.path.dirname(os.path.dirname(source))
    cmd = [nvcc() or "nvcc", "--cubin", f"-arch=sm_{arch}", "-O3", "-std=c++20", "-DWITH_CUDA"]
    cmd += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS) + ["-Xptxas", "-v", "-w"]
    cmd += [f"-I{d}" for d in [*includes, os.path.join(root, "csrc")]]
    return cmd + ["-o", output, source]


def _unqualified(mangled: str) -> str:
    """Last name of an Itanium-mangled ``_ZN<len><id>...E`` or ``_Z<len><id>`` name."""
    m = re.match(r"_ZN?((?:\d+)(?:.*))", mangled)
    if not m:
        return mangled
    rest, name = m.group(1), mangled
    while rest and rest[0].isdigit():
        digits = re.match(r"\d+", rest).group(0)
        size = int(digits)
        name, rest = rest[len(digits) : len(digits) + size], rest[len(digits) + size :]
        if not mangled.startswith("_ZN"):
            break
    return name


def demangle(names: list[str]) -> list[str]:
    """Unqualified function names of mangled C++ kernel names (c++filt, else a parser of
    plain nested names)."""
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if filt is None:
        return [_unqualified(n) for n in names]
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    short = []
    for original, full in zip(names, out.stdout.splitlines(), strict=False):
        m = re.search(r"([A-Za-z_]\w*)(?:<.*>)?\(", full)
        short.append(m.group(1) if m else _unqualified(original))
    return short


def compile_cuda_source(source: str, arch: int, out_dir: str) -> list[Resources]:
    """Compile one .cu for ``arch`` with ``nvcc -Xptxas -v``; resources per kernel.

    The cubin and log are written to ``out_dir``. Raises CalledProcessError (with nvcc's
    output) on a compile error.
    """
    base = os.path.join(out_dir, f"{os.path.basename(source)}.sm_{arch}")
    run = subprocess.run(
        nvcc_command(source, arch, base + ".cubin"), capture_output=True, text=True
    )
    log = run.stdout + run.stderr
    with open(base + ".log", "w") as f:
        f.write(log)
    if run.returncode != 0:
        raise subprocess.CalledProcessError(run.returncode, run.args, run.stdout, run.stderr)
    parsed = parse_ptxas_log(log)
    names = demangle([r.name for r in parsed])
    return [
        Resources(**{**r.__dict__, "name": name}) for r, name in zip(parsed, names, strict=True)
    ]


def cuda_spill_budget(kernel: str) -> int:
    """Spill bytes allowed for a CUDA kernel (``CUDA_SPILL_BUDGETS``; 0 by default)."""
    return CUDA_SPILL_BUDGETS.get(kernel, (0, ""))[0]


def cuda_block_size(source: str) -> int | None:
    """The block size a .cu launches with: its ``constexpr int k...Threads = N;``, in the
    .cu or in its kernel-body header ``<op>_kernels.h`` beside it."""
    header = source[: -len(".cu")] + "_kernels.h"
    for path in (source, header):
        if not os.path.exists(path):
            continue
        with open(path) as f:
            m = re.search(r"constexpr\s+int\s+k\w*Threads\s*=\s*(\d+)", f.read())
        if m:
            return int(m.group(1))
    return None


def cuda_resources(source: str, arch: int, cache_dir: str | None = None) -> list[Resources]:
    """``compile_cuda_source`` cached in ``cache_dir`` (default: a kdfast-aot folder in
    the temp dir) by a hash of csrc/ and the nvcc command; threads from ``kThreads``."""
    import hashlib
    import json

    root = repo_root() or os.path.dirname(os.path.dirname(source))
    digest = hashlib.sha256(" ".join(nvcc_command(source, arch, "-")).encode())
    for folder, _, files in sorted(os.walk(os.path.join(root, "csrc"))):
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), f"kdfast-aot-{os.getuid()}")
    out_dir = os.path.join(cache_dir, digest.hexdigest()[:16])
    cached = os.path.join(out_dir, f"{os.path.basename(source)}.sm_{arch}.json")
    if os.path.exists(cached):
        with open(cached) as f:
            return [Resources(**r) for r in json.load(f)]
    os.makedirs(out_dir, exist_ok=True)
    threads = cuda_block_size(source) or 0
    found = [
        Resources(**{**r.__dict__, "threads": threads})
        for r in compile_cuda_source(source, arch, out_dir)
    ]
    with open(cached, "w") as f:
        json.dump([r.__dict__ for r in found], f)
    return found
