"""The CUDA kernels run whole on the host, where there is no GPU.

tests/cuda_emulator compiles csrc/cuda/tes_loss_cuda.cu, as the working tree
has it, as host C++ with an emulator of the CUDA execution model: each block's
threads are fibers that switch at __syncthreads and at the warp shuffles,
__shared__ arrays are per-block storage, a device-side assert ends the launch
with an error, and blocks run one after another (tests/cuda_emulator/emulator.h
says how each CUDA name is emulated). ops.cpp is compiled into the same library
as `tesloss_emulated`, with the CUDA kernels bound to CPU tensors, so the
emulated op has the real op's argument handling, autograd, launch shapes
(chosen by tes_loss_cuda.cu for the emulated device's size) and kernels: the
forward, the finish kernel's tree over the blocks' partials, and the backward.

What it cannot see: timing and the memory model (a missing fence, a read of
memory another block is writing), the GPU's own exp2 (ex2.approx: the emulator
has the host exp2 the schedules test uses, docs/DESIGN.md), and anything nvcc
compiles differently from g++. tests/test_cuda.py covers those on a GPU.
"""
import ctypes
import dataclasses
import math
import os
import re
import shutil

import pytest
import torch
from cases import EDGE_TARGETS, ROW_LAYOUTS, build_case, draw_case, edge_case
from conftest import (ALL_DTYPES, FP64_RULE, Tolerance, assert_close, assert_matches_reference,
                      max_error, raw_params, run, run_reference64, rule_bounds, scales)
from fixed_cases import FOUND_BY_FUZZ, PARAMETER_EDGES, parameter_edge_case
from hypothesis import given, settings
from hypothesis import strategies as st

import tesloss
from tesloss import _build
from tesloss.reference import tes_loss as reference_tes_loss

pytestmark = pytest.mark.cuda_emulated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR = os.path.join(ROOT, "tests", "cuda_emulator")
# The kernels' sources: the working tree's, or a copy with a bug planted
# (tests/cuda_emulator/plant_bugs.sh).
CSRC = os.environ.get("TESLOSS_EMULATOR_CSRC", os.path.join(ROOT, "csrc"))

# Emulated devices: (multiprocessors, threads per multiprocessor). The launch
# shapes depend on the size: an H200 has room for every row of a small batch at
# once; one multiprocessor takes the rows in turns (the kernels' loops over
# rows), and gets fewer threads per row.
DEVICES = {"H200": (132, 2048), "1 SM": (1, 2048), "1 SM, 512 threads": (1, 512)}
# The orders the emulator runs a block's threads in (emulator.cpp's Order): in
# passes, in step; or always the first runnable thread by descending index or
# by a random priority, each warp as far ahead as its barriers let it.
ORDERS = {"round robin": 0, "high first": 1, "shuffled": 2}

# (threads per row, B, C, device) that reach each launch shape of the forward
# and the backward, as tes_loss_cuda.cu chooses it (launch_shapes.h); the
# boosted rows are batches too small to fill the device.
LAUNCH_SHAPES = [
    (8, 37, 100, "1 SM"),
    (32, 37, 1000, "1 SM"),
    (128, 37, 4097, "1 SM"),
    (128, 3, 1000, "H200"),    # boosted from 32
    (512, 5, 20000, "H200"),
    (512, 3, 2048, "H200"),    # boosted from 128
    (512, 9, 9000, "1 SM, 512 threads"),  # one block, taking the rows in turns
]


class Emulator:
    """The emulator's controls (emulator.cpp's extern "C" functions)."""

    def __init__(self, path):
        torch.ops.load_library(path)
        self.lib = ctypes.CDLL(path)
        self.lib.tesloss_emulator_configure.argtypes = [ctypes.c_int64, ctypes.c_int64,
                                                        ctypes.c_int32, ctypes.c_uint64,
                                                        ctypes.c_int32]
        self.lib.tesloss_emulator_launches.restype = ctypes.c_int64
        self.lib.tesloss_emulator_launches.argtypes = [ctypes.c_char_p, ctypes.c_int64]
        self.lib.tesloss_emulator_write_counts.restype = ctypes.c_int64
        self.lib.tesloss_emulator_write_counts.argtypes = [ctypes.c_void_p, ctypes.c_int64]

    def configure(self, device="H200", order="round robin", seed=0, count_writes=False):
        self.lib.tesloss_emulator_configure(*DEVICES[device], ORDERS[order], seed,
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


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The emulated op and its controls, compiled from the working tree. The flags
    are the compiler's plain ones: no -march, so no FMA contracts the row math."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the CUDA emulator")
    from torch.utils.cpp_extension import load

    _build._with_ninja_on_path()
    folder = tmp_path_factory.mktemp("cuda_emulator")
    flags = ["-O2", "-DTESLOSS_CUDA_EMULATOR", "-fno-strict-aliasing"]
    # TESLOSS_EMULATOR_CFLAGS=-fsanitize=thread builds it for ThreadSanitizer, whose
    # runtime then comes in LD_PRELOAD: for this process, not the compilers.
    flags += os.environ.get("TESLOSS_EMULATOR_CFLAGS", "").split()
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        path = load("tesloss_emulated",
                    [os.path.join(CSRC, "ops.cpp"), os.path.join(EMULATOR, "emulator.cpp"),
                     os.path.join(EMULATOR, "emulated_kernels.cpp")],
                    extra_include_paths=[os.path.join(EMULATOR, "include"), EMULATOR, CSRC],
                    extra_cflags=flags, extra_ldflags=["-Wl,-Bsymbolic"] + flags[3:],
                    build_directory=str(folder), is_python_module=False)
    except RuntimeError as error:
        pytest.fail(f"the CUDA emulator did not build:\n{error}")
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    return Emulator(path)


def emulated_tes_loss(vis_logits, txt_logits, target, **kwargs):
    """fused_tes_loss's loss through the emulated CUDA kernels (tesloss_emulated)."""
    return torch.ops.tesloss_emulated.tes_loss_forward(vis_logits, txt_logits, target,
                                                       **raw_params(**kwargs))[0]


def kernels_run(emulator):
    """{kernel's name without template arguments: threads per row (or None)}."""
    shapes = {}
    for kernel, blocks, threads in emulator.launches():
        name, _, args = kernel.partition("<")
        numbers = [int(x) for x in re.findall(r"\b\d+\b", args)]
        shapes[name] = numbers[-2] if name != "tes_finish_kernel" else None
    return shapes


def assert_like_the_cpu_op(case, dtype, emulated, in_dtype):
    """The emulated kernels against the CPU op. Both meet the rule against the fp64
    truth (assert_matches_reference), so they differ by at most twice its bound;
    nans sit in the same places, and an ignored row's gradients are exact zeros in
    both. `in_dtype`: the recipe's outputs in the inputs' dtype (None for fp64)."""
    cpu = run(tesloss.fused_tes_loss, case, dtype)
    names = ("loss", "grad vis_logits", "grad txt_logits")
    for name, e, c in zip(names, emulated, cpu):
        assert torch.equal(torch.isnan(e), torch.isnan(c)), f"{name}: nans differ from the CPU op"
        if name != "loss" and not case.probs:
            assert not e[~case.valid()].any(), f"{name}: an ignored row's gradient is not zero"
    if dtype == torch.float64:
        tol = Tolerance(rtol=2 * FP64_RULE.rtol, atol=2 * FP64_RULE.atol)
        for name, e, c, scale in zip(names, emulated, cpu, scales(case)):
            assert_close(e, c.double(), tol, torch.as_tensor(scale), f"{name}, against the CPU op")
        return
    bounds = rule_bounds(case, emulated, run_reference64(case, dtype), in_dtype)
    for name, e, c, (allowed, _, _) in zip(names, emulated, cpu, bounds):
        assert max_error(e, c.double()) <= 2 * allowed, (
            f"{name} in {dtype}: emulated CUDA and CPU op differ by {max_error(e, c.double()):.3e}"
            f" > {2 * allowed:.3e}")


def check(emulator, case, dtype, device="H200", order="round robin"):
    emulator.configure(device, order)
    emulated = run(emulated_tes_loss, case, dtype)
    in_dtype = run(reference_tes_loss, case, dtype) if dtype != torch.float64 else None
    assert_matches_reference(case, dtype, emulated, in_dtype, where=f", emulated CUDA on {device}")
    assert_like_the_cpu_op(case, dtype, emulated, in_dtype)
    return emulated


@pytest.mark.parametrize("device", ["H200", "1 SM, 512 threads"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@settings(max_examples=20)
@given(data=st.data())
def test_values_and_gradients_match_the_reference_and_the_cpu_op(emulator, dtype, device, data):
    check(emulator, draw_case(data, dtype, max_b=16, max_c=20000), dtype, device)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("target", ["index", "probs"])
@pytest.mark.parametrize("edge", PARAMETER_EDGES)
def test_parameters_at_their_edges(emulator, edge, target, dtype):
    check(emulator, parameter_edge_case(edge, dtype, target), dtype)


@pytest.mark.parametrize("device", ["H200", "1 SM, 512 threads"])
@pytest.mark.parametrize("found", FOUND_BY_FUZZ)
def test_what_random_draws_found(emulator, found, device):
    dtype, drawn = FOUND_BY_FUZZ[found]
    check(emulator, build_case(dtype, **drawn), dtype, device)


@pytest.mark.parametrize("target", EDGE_TARGETS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("tpr, batch, num_classes, device", LAUNCH_SHAPES)
def test_every_launch_shape_runs_forward_finish_and_backward(emulator, tpr, batch, num_classes,
                                                             device, dtype, target):
    case = edge_case(dtype, num_classes, "offset 1", batch, target)
    check(emulator, case, dtype, device)
    assert kernels_run(emulator) == {"tes_forward_kernel": tpr, "tes_finish_kernel": None,
                                     "tes_backward_kernel": tpr}


@pytest.mark.parametrize("layout", ROW_LAYOUTS)
@pytest.mark.parametrize("target", EDGE_TARGETS)
@pytest.mark.parametrize("tpr, batch, num_classes, device",
                         [s for s in LAUNCH_SHAPES if s[2] <= 4097])
def test_each_gradient_element_is_written_exactly_once(emulator, tpr, batch, num_classes, device,
                                                       target, layout):
    case = edge_case(torch.float32, num_classes, layout, batch, target)  # every fifth row ignored
    emulator.configure(device, count_writes=True)
    run(emulated_tes_loss, case)
    counts = emulator.write_counts().view(2, *case.shape)
    for name, count in zip(("grad vis_logits", "grad txt_logits"), counts):
        wrong = (count != 1).nonzero()
        assert len(wrong) == 0, (f"{name}: {len(wrong)} elements not written exactly once, first "
                                 f"[row, column] {wrong[0].tolist()} written "
                                 f"{int(count[tuple(wrong[0])])} times")


@pytest.mark.parametrize("tpr, batch, num_classes, device", LAUNCH_SHAPES)
def test_the_order_threads_and_blocks_run_in_changes_no_bit(emulator, tpr, batch, num_classes,
                                                            device):
    # Probability rows: the most fields go through the shuffles and shared memory.
    case = edge_case(torch.float32, num_classes, "contiguous", batch, "probs")
    results = {}
    for order in ORDERS:
        emulator.configure(device, order, seed=7)
        results[order] = run(emulated_tes_loss, case)
    for order, outputs in results.items():
        for name, x, first in zip(("loss", "grad vis_logits", "grad txt_logits"), outputs,
                                  results["round robin"]):
            assert torch.equal(x, first), f"{name} changes with the {order} order"


def test_rows_in_turns_on_a_small_device_give_the_same_bits(emulator):
    # 300 rows of 100 classes: 8 threads per row on every device, so blocks of 32
    # rows: 10 blocks on an H200, 8 on one multiprocessor and 2 where it has 512
    # threads, which take the rest of the rows in turns; the finish kernel adds
    # 10, 8 or 2 partials. Rows are the same bits; so is the batch's sum,
    # compensated in fp64 (batch_sum.h), exact far below fp32's rounding.
    case = edge_case(torch.float32, 100, "row stride +5", 300, "smoothed")
    results, blocks = {}, {}
    for device in DEVICES:
        emulator.configure(device)
        results[device] = run(emulated_tes_loss, case)
        assert kernels_run(emulator)["tes_forward_kernel"] == 8
        blocks[device] = emulator.launches()[0][1]
    assert blocks == {"H200": 10, "1 SM": 8, "1 SM, 512 threads": 2}
    for device, outputs in results.items():
        for name, x, first in zip(("loss", "grad vis_logits", "grad txt_logits"), outputs,
                                  results["H200"]):
            assert torch.equal(x, first), f"{name} on {device} differs from the H200's"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_empty_batch_runs_the_finish_kernel_alone(emulator, reduction):
    emulator.configure()
    empty = torch.empty(0, 10)
    loss, row_stats, batch_stats = torch.ops.tesloss_emulated.tes_loss_forward(
        empty, empty, torch.empty(0, dtype=torch.long), **raw_params(reduction=reduction))
    assert [k.partition("<")[0] for k, _, _ in emulator.launches()] == ["tes_finish_kernel"]
    expected = torch.ops.tesloss.tes_loss_forward(
        empty, empty, torch.empty(0, dtype=torch.long), **raw_params(reduction=reduction))
    for x, e in zip((loss, row_stats, batch_stats), expected):
        assert x.shape == e.shape and torch.equal(torch.isnan(x), torch.isnan(e))
        assert torch.equal(x.nan_to_num(), e.nan_to_num())


@pytest.mark.parametrize("label", [100, -1, -101])
@pytest.mark.parametrize("tpr, batch, num_classes, device", LAUNCH_SHAPES[:3] + LAUNCH_SHAPES[4:5])
def test_a_label_out_of_range_trips_the_forward_device_assert(emulator, tpr, batch, num_classes,
                                                             device, label):
    case = edge_case(torch.float32, num_classes, "contiguous", batch)
    case.target[batch // 2] = label if label != 100 else num_classes
    emulator.configure(device)
    with pytest.raises(RuntimeError, match=r"device-side assert triggered: `ignored \|\| valid`"):
        emulated_tes_loss(case.vis_logits, case.txt_logits, case.target, **case.kwargs)


def test_a_label_out_of_range_trips_the_backward_device_assert(emulator):
    case = edge_case(torch.float32, 1000, "contiguous", 8)
    emulator.configure("1 SM")
    params = raw_params(**case.kwargs)
    loss, row_stats, batch_stats = torch.ops.tesloss_emulated.tes_loss_forward(
        case.vis_logits, case.txt_logits, case.target, **params)
    bad = case.target.clone()
    bad[3] = 1000
    with pytest.raises(RuntimeError, match=r"device-side assert triggered: .*is_valid_label"):
        torch.ops.tesloss_emulated.tes_loss_backward(
            torch.ones(()), case.vis_logits, case.txt_logits, bad, row_stats, batch_stats, **params)


@pytest.mark.parametrize("where", ["vis", "txt"])
def test_a_nan_logit_reaches_the_loss_and_the_gradients(emulator, where):
    case = edge_case(torch.float32, 1001, "offset 1", 4)
    case = dataclasses.replace(case, kwargs={**case.kwargs, "reduction": "none"},
                               grad_out=torch.ones(4, dtype=torch.float64))
    (case.vis_logits if where == "vis" else case.txt_logits)[2, 500] = math.nan
    emulator.configure("1 SM")
    emulated = run(emulated_tes_loss, case)
    for name, x, e in zip(("loss", "grad vis_logits", "grad txt_logits"), emulated,
                          run_reference64(case)):
        assert torch.equal(torch.isnan(x), torch.isnan(e)), f"{name}: nans differ"
