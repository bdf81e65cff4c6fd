"""Builds tesloss: the Python package with its kernels' sources, and tesloss._C ahead of
time when torch is importable here.

Under pip's build isolation torch is not importable (tesloss does not list it as a build
requirement, so that pip never fetches a second torch to compile against): the package
is then installed without tesloss._C, and compiles its kernels for the torch in use on
first use (tesloss/_build.py). With torch importable (pip install --no-build-isolation,
make install), tesloss._C is compiled now:

  FORCE_CUDA=1                 compile csrc/cuda even where torch sees no GPU (nvcc is still needed)
  TESLOSS_NO_CUDA=1            never compile csrc/cuda
  TORCH_CUDA_ARCH_LIST         CUDA architectures; "8.0;9.0" when unset and no GPU is visible
  TESLOSS_CPU_CAPABILITY       avx512 | avx2 | default; by default the build machine's, as torch reports it
"""
import importlib.util
import json
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    # By path: importing the package tesloss would load torch and the library.
    spec = importlib.util.spec_from_file_location("tesloss_build", os.path.join(ROOT, "tesloss", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()


class BuildPyWithSources(build_py):
    """Installs csrc as tesloss/_csrc: the sources of the just-in-time build."""

    def run(self):
        super().run()
        source = os.path.join(ROOT, "csrc")
        for path in _build.source_files(source):
            target = os.path.join(self.build_lib, "tesloss", _build.INSTALLED_SOURCES, path)
            self.mkpath(os.path.dirname(target))
            self.copy_file(os.path.join(source, path), target)


def _torch_importable():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _ahead_of_time():
    """(ext_modules, cmdclass) that compile tesloss._C against the torch importable here."""
    _build.set_cuda_home()  # before cpp_extension reads it at import
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    class BuildExtRecordingTorch(BuildExtension):
        """Writes, beside tesloss._C, the torch it was compiled against: tesloss loads
        it only under that torch, and builds its kernels again under any other."""

        def run(self):
            super().run()
            folder = os.path.dirname(self.get_ext_fullpath("tesloss._C"))
            with open(os.path.join(folder, _build.BUILD_INFO), "w") as file:
                json.dump({**_build.build_record(), "cpu_capability": capability}, file)

    capability = _build.cpu_capability()
    source = os.path.join(ROOT, "csrc")
    cuda, note = _build.cuda_plan(for_jit=False)
    if note:
        print(f"tesloss: {note}", file=sys.stderr)
    sources = [os.path.relpath(path, ROOT) for path in _build.compiled_sources(source, cuda)]
    common = dict(name="tesloss._C", sources=sources, include_dirs=[source],
                  extra_link_args=_build.LDFLAGS)
    if cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _build.cuda_archs()
        common["include_dirs"] += _build.wheel_cuda_include_dirs(CUDA_HOME)
        extension = CUDAExtension(extra_compile_args={"cxx": _build.cxx_flags(capability, True),
                                                      "nvcc": _build.nvcc_flags(
                                                          os.environ["TORCH_CUDA_ARCH_LIST"])},
                                 **common)
    else:
        extension = CppExtension(extra_compile_args={"cxx": _build.cxx_flags(capability, False)},
                                 **common)
    return [extension], {"build_ext": BuildExtRecordingTorch}


if _torch_importable():
    ext_modules, cmdclass = _ahead_of_time()
else:
    print("tesloss: torch is not importable in this build environment (pip's build isolation): "
          "installing without a prebuilt library; tesloss compiles its kernels for the torch "
          "in use on first use", file=sys.stderr)
    ext_modules, cmdclass = [], {}
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
