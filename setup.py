"""Build kdfast and its extension ``kdfast._C``.

* C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) whenever a C++ compiler exists;
* CUDA sources (csrc/cuda/*.cu) too when torch is a CUDA build and nvcc is found
  (TORCH_CUDA_ARCH_LIST honoured, default "8.0;9.0");
* KDFAST_NO_EXT=1: no extension (pure Python);
* KDFAST_NO_CUDA=1: C++ sources only, even with a CUDA torch and nvcc (faster dev builds);
* MAX_JOBS: parallel compile jobs (default: from cores and memory).

Install after torch with ``pip install --no-build-isolation .`` so that the extension is
compiled against the torch that is installed.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(message: str) -> None:
    print(f"kdfast setup: {message}", file=sys.stderr)


def find_cuda_home() -> str | None:
    """CUDA_HOME, or the toolkit around the nvcc on PATH (resolving wrapper scripts)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"]
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            return home
    return None


def pip_cuda_include_dirs() -> list[str]:
    """Headers of the pip CUDA libraries torch depends on (cusparse.h, cublas_v2.h, ...),
    which ATen's CUDA headers include but a bare toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    return [d for d in dirs if glob.glob(os.path.join(d, "cusparse*.h"))]


def default_max_jobs() -> str:
    """One job per core, at most one per 3 GiB of memory (nvcc jobs are large)."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        by_memory = max(1, pages // (3 << 30))
    except (ValueError, OSError):
        by_memory = 1
    return str(max(1, min(os.cpu_count() or 1, by_memory)))


def extension_modules():
    if os.environ.get("KDFAST_NO_EXT") == "1":
        log("KDFAST_NO_EXT=1: building pure Python, no extension")
        return [], {}
    try:
        import torch
    except ImportError:
        log(
            "torch is not importable: building pure Python (install torch first, then "
            "reinstall kdfast with --no-build-isolation)"
        )
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        log("no C++ compiler found: building pure Python, no extension")
        return [], {}

    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", default_max_jobs())
    with_cuda = torch.version.cuda is not None and cuda_home is not None
    if with_cuda and os.environ.get("KDFAST_NO_CUDA") == "1":
        log("KDFAST_NO_CUDA=1: compiling C++ sources only")
        with_cuda = False
    if torch.version.cuda is not None and cuda_home is None:
        log("torch is a CUDA build but nvcc was not found: compiling C++ sources only")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    archs = ""
    macros = [("KDFAST_TORCH_VERSION", f'"{torch.__version__}"')]
    # -fno-trapping-math: GCC does not if-convert (so does not vectorise) loops with float
    # compares and selects, such as the clamped exp of csrc/cpu/logit_rows.h, while it must
    # preserve FP exception flags; kdfast never reads them.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros += [("WITH_CUDA", None), ("KDFAST_CUDA_ARCHS", f'"{archs}"')]
        nvcc_version = (
            subprocess.run(
                [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1:]
        )
        log(f"compiling CUDA sources with {nvcc_version} for archs {archs}")
        ext = CUDAExtension(
            "kdfast._C",
            sources,
            define_macros=macros,
            include_dirs=pip_cuda_include_dirs(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "kdfast._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    log(f"building kdfast._C against torch {torch.__version__} ({len(sources)} sources)")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["kdfast", "kdfast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
