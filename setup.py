"""Builds tesloss._C: the C++ kernels always, the CUDA kernels when asked for or when they can be.

Environment:
  FORCE_CUDA=1                 compile csrc/cuda even where torch sees no GPU (nvcc is still needed)
  TESLOSS_NO_CUDA=1            never compile csrc/cuda
  TORCH_CUDA_ARCH_LIST         CUDA architectures; "8.0;9.0" when unset and no GPU is visible
  TESLOSS_CPU_CAPABILITY       avx512 | avx2 | default; by default the build machine's, as torch reports it
"""
import glob
import os

import shutil

import torch
from setuptools import setup


def _set_cuda_home():
    """torch takes the CUDA home from nvcc's folder, which is wrong when nvcc on
    the PATH is a wrapper script outside the toolkit: look for the toolkit nvcc
    belongs to instead. CUDA_HOME, if set, wins."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_set_cuda_home()  # before cpp_extension reads it at import

from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension)

ROOT = os.path.dirname(os.path.abspath(__file__))

# ATen's own flags for each of its x86 vector capabilities.
CPU_CAPABILITY_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def cpu_capability():
    choice = os.environ.get("TESLOSS_CPU_CAPABILITY", "auto").lower()
    if choice == "auto":
        reported = torch.backends.cpu.get_cpu_capability()
        choice = {"AVX512": "avx512", "AVX2": "avx2"}.get(reported, "default")
    if choice not in CPU_CAPABILITY_FLAGS:
        raise SystemExit(
            f"TESLOSS_CPU_CAPABILITY must be one of {sorted(CPU_CAPABILITY_FLAGS)} or auto, got {choice!r}"
        )
    return choice


def build_cuda():
    if os.environ.get("TESLOSS_NO_CUDA") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def wheel_cuda_include_dirs():
    """ATen's CUDA headers include cuSPARSE's and cuBLAS's. A toolkit with nvcc
    alone lacks them; torch's CUDA wheels bring them under site-packages/nvidia."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include")))


def relative_sources(*pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, *pattern)))


def extensions():
    capability = cpu_capability()
    cxx_flags = ["-O3", "-fopenmp", f"-DTESLOSS_CPU_CAPABILITY_NAME={capability}"]
    cxx_flags += CPU_CAPABILITY_FLAGS[capability]
    sources = relative_sources("csrc", "*.cpp") + relative_sources("csrc", "cpu", "*.cpp")
    cuda_sources = relative_sources("csrc", "cuda", "*.cu")
    common = dict(name="tesloss._C", include_dirs=[os.path.join(ROOT, "csrc")],
                  extra_link_args=["-fopenmp"])
    if cuda_sources and build_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DWITH_CUDA"]
        common["include_dirs"] += wheel_cuda_include_dirs()
        return [CUDAExtension(sources=sources + cuda_sources,
                              extra_compile_args={"cxx": cxx_flags + ["-DWITH_CUDA"],
                                                  "nvcc": nvcc_flags},
                              **common)]
    return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension})
