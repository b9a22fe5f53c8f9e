"""64-bit offsets in the CUDA kernels, checked on their PTX.

Compiles every csrc/cuda/*.cu to PTX (nvcc -ptx, compute_80) and checks each kernel body
for the signature of 32-bit indexing: ``mul.wide.s32`` / ``mul.wide.u32`` turning a 32-bit
*index register* into a byte offset (``int i = blockIdx.x * blockDim.x + threadIdx.x;
p[i]``). Kernels that compute their index as int64 (``static_cast<int64_t>(blockIdx.x) *
blockDim.x + threadIdx.x``) widen only the block offset, with a constant-free multiply of
two special registers; flagged here is a widening multiply by the element size (a literal
2, 4 or 8), which is how nvcc forms a byte offset from a 32-bit index. Exempt is a register
loaded straight from ``%tid.*``: a thread index within its block is below 1024, so widening it
alone (``X + threadIdx.x`` in a block-per-matrix kernel) cannot overflow.

Slow (several minutes of nvcc per file on a loaded machine) and needs nvcc: run in the CI
stage that builds CUDA, ``pytest -m slow tests/kernels/test_ptx.py``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
from conftest import ROOT

CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
#: a 32-bit index scaled to a byte offset: mul.wide.{s,u}32 %rdN, %rM, <element size>
NARROW_OFFSET = re.compile(r"mul\.wide\.[su]32\s+%rd\d+,\s*(%r\d+),\s*(?:2|4|8|16);")
#: a register holding a thread index within the block (< 1024)
THREAD_INDEX = re.compile(r"mov\.u32\s+(%r\d+),\s*%tid\.[xyz];")


def _narrow_offsets(body: str) -> list[str]:
    """The 32-bit registers that ``body`` scales to byte offsets, thread indices excepted."""
    bounded = set(THREAD_INDEX.findall(body))
    return [reg for reg in NARROW_OFFSET.findall(body) if reg not in bounded]


def _kernels(ptx: str) -> dict[str, str]:
    bodies = {}
    for match in re.finditer(r"\.entry\s+(\S+)\((.*?)\n\}", ptx, re.S):
        bodies[match.group(1)] = match.group(2)
    return bodies


def _ptx(source: str, out: str) -> str:
    from torch.utils.cpp_extension import include_paths

    dirs = [*include_paths("cuda"), sysconfig.get_paths()["include"]]
    nvcc_home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    dirs += [os.path.join(home, "include") for home in (nvcc_home, "/usr/local/cuda")]
    try:  # pip CUDA headers (cusparse.h, ...) that ATen's CUDA headers include, as setup.py
        import nvidia

        for root in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    except ImportError:
        pass
    flags = [f"-I{d}" for d in dirs if os.path.isdir(d)]
    subprocess.run(
        [
            shutil.which("nvcc"),
            "-ptx",
            "-arch=compute_80",
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "-DWITH_CUDA",
            *flags,
            source,
            "-o",
            out,
        ],
        check=True,
        capture_output=True,
    )
    with open(out) as f:
        return f.read()


def test_detector_flags_32_bit_indexing():
    narrow = "mul.wide.s32 \t%rd4, %r5, 8;"
    wide = "mul.wide.u32 \t%rd1, %r1, %r2;\nshl.b64 \t%rd4, %rd3, 3;"
    tid = "mov.u32 \t%r7, %tid.x;\nmul.wide.u32 \t%rd2, %r7, 8;"
    assert _narrow_offsets(narrow) == ["%r5"] and _narrow_offsets(wide) == []
    assert _narrow_offsets(tid) == [] and _narrow_offsets(tid + "\n" + narrow) == ["%r5"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_kernels_use_64_bit_offsets(source, tmp_path):
    kernels = _kernels(_ptx(source, str(tmp_path / "out.ptx")))
    assert kernels, f"no kernels found in the PTX of {source}"
    for name, body in kernels.items():
        bad = _narrow_offsets(body)
        assert not bad, (
            f"{os.path.basename(source)}: kernel {name} forms offsets from 32-bit indices"
        )
