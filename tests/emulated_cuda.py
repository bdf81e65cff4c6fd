"""The CUDA kernels on the host, where there is no GPU: the emulated op's build
and its controls, shared by the suite's emulated CUDA device (conftest.DEVICES)
and tests/test_cuda_emulated.py.

tests/cuda_emulator compiles csrc/cuda/tes_loss_cuda.cu, as the working tree
has it, as host C++ with an emulator of the CUDA execution model: each block's
threads are fibers that switch at __syncthreads and at the warp shuffles,
__shared__ arrays are per-block storage, a device-side assert ends the launch
with an error, and blocks run one after another (tests/cuda_emulator/emulator.h
says how each CUDA name is emulated). ops.cpp is compiled into the same library
as `tesloss_emulated`, with the CUDA kernels bound to CPU tensors, so the
emulated op has the real op's argument handling, autograd, launch shapes
(chosen by tes_loss_cuda.cu for the emulated device's size) and kernels: the
forward, the finish kernel's tree over the blocks' partials, the backward, and
the single pass (its count of rows, its rows, and the backward's scaling).

What it cannot see: timing and the memory model (a missing fence, a read of
memory another block is writing), the GPU's own exp2 (ex2.approx: the emulator
has the host exp2 the schedules test uses, docs/DESIGN.md), and anything nvcc
compiles differently from g++. tests/test_cuda.py covers those on a GPU.
"""
import ctypes
import os
import shutil

import torch

from tesloss import _build, _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR = os.path.join(ROOT, "tests", "cuda_emulator")
# The kernels' sources: the working tree's, or a copy with a bug planted
# (tests/cuda_emulator/plant_bugs.sh).
CSRC = os.environ.get("TESLOSS_EMULATOR_CSRC", os.path.join(ROOT, "csrc"))

# Emulated devices: (multiprocessors, threads per multiprocessor). The launch
# shapes depend on the size: an H200 has room for every row of a small batch at
# once; one multiprocessor takes the rows in turns (the kernels' loops over
# rows), and gets fewer threads per row.
SIZES = {"H200": (132, 2048), "1 SM": (1, 2048), "1 SM, 512 threads": (1, 512)}
# The orders the emulator runs a block's threads in (emulator.cpp's Order): in
# passes, in step; or always the first runnable thread by descending index or
# by a random priority, each warp as far ahead as its barriers let it.
ORDERS = {"round robin": 0, "high first": 1, "shuffled": 2}


class EmulatedCuda(str):
    """The suite's emulated CUDA device. Its tensors are CPU tensors, so to torch it
    is the string "cpu"; while a test runs on it, the op fused_tes_loss calls is
    the emulated one (conftest's _kernels_of_the_device)."""

    kernels = "emulated CUDA"

    def __new__(cls):
        return super().__new__(cls, "cpu")

    # Not equal to "cpu": pytest reuses a session fixture's value when its new
    # param == the cached one, so as a plain str subclass the emulated device
    # took the CPU's cached value whenever its tests followed the CPU's, and
    # ran the CPU kernels under the emulated device's name.
    def __eq__(self, other):
        return isinstance(other, EmulatedCuda)

    def __ne__(self, other):
        return not self == other

    __hash__ = str.__hash__


EMULATED_CUDA = EmulatedCuda()


def runs_cuda_kernels(device):
    """Whether a property on `device` runs the CUDA kernels (on a GPU or emulated)."""
    return device == "cuda" or isinstance(device, EmulatedCuda)


def describe(device):
    """The device's name in a message: "cpu", "cuda" or "emulated CUDA"."""
    return getattr(device, "kernels", str(device))


class Emulator:
    """The emulated op (torch.ops.tesloss_emulated) and the emulator's controls
    (emulator.cpp's extern "C" functions)."""

    def __init__(self, path):
        torch.ops.load_library(path)
        self.ops = torch.ops.tesloss_emulated
        # The real op's fake kernels, so that torch.compile traces the emulated op too.
        for op, fake in (("tes_loss_forward", _ops._forward_fake),
                         ("tes_loss_step", _ops._step_fake),
                         ("tes_loss_backward", _ops._backward_fake)):
            torch.library.register_fake(f"tesloss_emulated::{op}")(fake)
        self.lib = ctypes.CDLL(path)
        self.lib.tesloss_emulator_configure.argtypes = [ctypes.c_int64, ctypes.c_int64,
                                                        ctypes.c_int32, ctypes.c_uint64,
                                                        ctypes.c_int32]
        self.lib.tesloss_emulator_launches.restype = ctypes.c_int64
        self.lib.tesloss_emulator_launches.argtypes = [ctypes.c_char_p, ctypes.c_int64]
        self.lib.tesloss_emulator_write_counts.restype = ctypes.c_int64
        self.lib.tesloss_emulator_write_counts.argtypes = [ctypes.c_void_p, ctypes.c_int64]

    def configure(self, device="H200", order="round robin", seed=0, count_writes=False):
        self.lib.tesloss_emulator_configure(*SIZES[device], ORDERS[order], seed,
                                            int(count_writes))

    def launches(self):
        """[(kernel, blocks, threads)] since configure, in launch order."""
        size = self.lib.tesloss_emulator_launches(None, 0)
        log = ctypes.create_string_buffer(size)
        self.lib.tesloss_emulator_launches(log, size)
        return [(kernel, int(blocks), int(threads)) for kernel, blocks, threads in
                (line.rsplit(" ", 2) for line in log.raw.decode().splitlines())]

    def write_counts(self):
        """[elements] int32: how often the last counted launch wrote each element."""
        counts = torch.zeros(self.lib.tesloss_emulator_write_counts(None, 0), dtype=torch.int32)
        self.lib.tesloss_emulator_write_counts(counts.data_ptr(), counts.numel())
        return counts


class NoCompiler(Exception):
    """There is no C++ compiler to build the emulator with."""


def build(folder):
    """The Emulator, compiled from CSRC into `folder`. The flags are the compiler's
    plain ones: no -march, so no FMA contracts the row math; libstdc++ linked
    shared, as _build.LDFLAGS says why."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise NoCompiler("no C++ compiler to build the CUDA emulator")
    from torch.utils.cpp_extension import load

    _build._with_ninja_on_path()
    flags = ["-O2", "-DTESLOSS_CUDA_EMULATOR", "-fno-strict-aliasing"]
    # TESLOSS_EMULATOR_CFLAGS=-fsanitize=thread builds it for ThreadSanitizer, whose
    # runtime then comes in LD_PRELOAD: for this process, not the compilers.
    flags += os.environ.get("TESLOSS_EMULATOR_CFLAGS", "").split()
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        path = load("tesloss_emulated",
                    [os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "tensors.cpp"),
                     os.path.join(EMULATOR, "emulator.cpp"),
                     os.path.join(EMULATOR, "emulated_kernels.cpp")],
                    extra_include_paths=[os.path.join(EMULATOR, "include"), EMULATOR, CSRC],
                    extra_cflags=flags, extra_ldflags=["-Wl,-Bsymbolic", "-lstdc++"] + flags[3:],
                    build_directory=str(folder), is_python_module=False)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    return Emulator(path)
