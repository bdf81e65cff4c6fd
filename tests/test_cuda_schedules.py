"""The CUDA kernels' thread schedules, run on the host, where there is no GPU.

csrc/cuda/schedules.cuh says which columns thread t of a row's group reads and
writes, and how they fold into one state. It is host-and-device code that
compiles without ATen, so tests/cuda_schedules_on_host.cu runs it one thread at
a time, for every launch shape (8, 32, 128 and 512 threads per row), and merges
the threads' states in the order the kernels do. These tests hold what comes
out to the spec every kernel is held to (conftest.assert_matches_reference: the
tolerance table and half-type rule against the fp64 reference), on misaligned
and row-strided rows too. They also check that each gradient element is written
exactly once, and that a nan logit reaches the loss and the gradients as it
does in the reference.

Not covered here: the kernels themselves (launches, shuffles, shared memory,
barriers, the batch reduction) and the choice of launch shape;
tests/test_cuda_emulated.py runs those on a host emulator of the GPU, and the
device-parametrized tests on a GPU.
"""
import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch
from cases import draw_case
from conftest import TOLERANCES, raw_params
from hypothesis import given, settings
from hypothesis import strategies as st

import tesloss
from tesloss import _ops
from tesloss.reference import tes_loss as reference_tes_loss
from tesloss.testing import (ALL_DTYPES, EDGE_CLASSES, EDGE_TARGETS, ROW_LAYOUTS, assert_close,
                             assert_matches_reference, edge_case, run, run_reference64, scales,
                             subnormal_weights_case)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS_PER_ROW = (8, 32, 128, 512)  # the kernels' launch shapes
# The most classes a launch gives each schedule (launch_shapes.h's threads_per_row):
# a thread sums its columns in order, so a schedule drawn with more columns per
# thread than any launch gives it would be held to sums no launch makes.
MOST_CLASSES = {8: 128, 32: 1024, 128: 8192, 512: 9000}
DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
# Elements around each gradient where no write may land; 16 of any dtype keep
# the gradient's first row 16-byte aligned, as at::empty leaves it on the GPU.
GUARD = 16


class Params(ctypes.Structure):
    """csrc/params.h's Params, from the parameter table the library exports."""
    _fields_ = [(name, {"float": ctypes.c_double, "int": ctypes.c_int64}[kind])
                for name, kind in _ops.PARAMS]


class Rows(ctypes.Structure):
    """The Rows struct of tests/cuda_schedules_on_host.cu."""
    _fields_ = [("vis", ctypes.c_void_p), ("txt", ctypes.c_void_p), ("labels", ctypes.c_void_p),
                ("probs", ctypes.c_void_p), ("vis_stride", ctypes.c_int64),
                ("txt_stride", ctypes.c_int64), ("target_stride", ctypes.c_int64),
                ("B", ctypes.c_int64), ("C", ctypes.c_int), ("params", Params)]


@pytest.fixture(scope="session")
def schedules(shared_build):
    """tests/cuda_schedules_on_host.cu built by nvcc as a host library. Where
    tesloss has CUDA kernels, nvcc built them, so it must be found here too."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if tesloss.backend_info()["cuda_compiled"]:
            pytest.fail("tesloss has CUDA kernels, but nvcc is not on the PATH to build "
                        "their thread schedules for the host")
        pytest.skip("nvcc is not on the PATH")
    folder, lock = shared_build("schedules")
    library = folder / "schedules.so"
    with lock:
        if not library.exists():
            _compile_schedules(nvcc, library)
    return ctypes.CDLL(str(library))


def _compile_schedules(nvcc, library):
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    # -fno-strict-aliasing: under nvcc, c10::BFloat16's conversion to float reads
    # its bits through an __nv_bfloat16 lvalue. In host code gcc may then drop the
    # copy a Pack load makes, and every bf16 value reads as 0: a host-side
    # artefact (torch's CUDA kernels load bf16 in packs just as ours do).
    build = subprocess.run(
        [nvcc, "-std=c++17", "-O2", "--expt-relaxed-constexpr", "-cudart", "none", "-shared",
         "-Xcompiler", "-fPIC,-fno-strict-aliasing", "-I", os.path.join(ROOT, "csrc"),
         "-I", torch_include,
         "-o", str(library), os.path.join(ROOT, "tests", "cuda_schedules_on_host.cu")],
        capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"nvcc could not build the schedules for the host:\n{build.stderr}")


def unit_class_stride(logits):
    """What the op hands its kernels: rows as they are, columns one element apart."""
    return logits if logits.shape[1] <= 1 or logits.stride(1) == 1 else logits.contiguous()


def call(function, *args):
    status = function(*args)
    assert status == 0, (f"{function.__name__} returned {status} (1: bad dtype or shape, "
                         "2: bad label, 3: a pack access that is not 16-byte aligned)")


def run_schedules(schedules, case, tpr, count_writes=False):
    """(loss, grad vis_logits, grad txt_logits) from the CUDA thread schedules
    for `tpr` threads per row, and with count_writes how many times each
    element of the gradients and their guards was written, [2, GUARD + B * C +
    GUARD]. The batch reduction, which is not the schedules' work, is done here."""
    vis, txt = unit_class_stride(case.vis_logits), unit_class_stride(case.txt_logits)
    dtype, target, kw = vis.dtype, case.target, case.kwargs
    acc = _ops.acc_dtype(dtype)
    batch, num_classes = vis.shape
    if case.probs:  # what the op hands the kernels: the accumulation type, class stride 1
        target = unit_class_stride(target if target.dtype == acc else target.to(acc))
    labels, probs = (None, target.data_ptr()) if case.probs else (target.data_ptr(), None)
    rows = Rows(vis.data_ptr(), txt.data_ptr(), labels, probs, vis.stride(0), txt.stride(0),
                target.stride(0), batch, num_classes, Params(**raw_params(**kw)))
    code = DTYPE_CODES[dtype]

    row_stats = torch.full((batch, len(_ops.ROW_STATS)), math.nan, dtype=acc)
    call(schedules.tesloss_schedule_forward, code, tpr, ctypes.byref(rows),
         ctypes.c_void_p(row_stats.data_ptr()))
    num_valid = case.valid().sum().to(acc)
    grad_out = case.grad_out.to(acc)
    row_loss = row_stats[:, _ops.ROW_STATS.index("loss")]
    if kw["reduction"] == "none":
        loss, upstream = row_loss, grad_out.contiguous()
    elif kw["reduction"] == "sum":
        loss, upstream = row_loss.sum(), grad_out.expand(batch).contiguous()
    else:
        loss, upstream = row_loss.sum() / num_valid, (grad_out / num_valid).expand(
            batch).contiguous()

    # nan until written, so an element no thread writes fails the comparison. With
    # count_writes, GUARD elements before and after each gradient catch stray writes.
    guard = GUARD if count_writes else 0
    grads = [torch.full((guard + batch * num_classes + guard,), math.nan, dtype=dtype)
             for _ in range(2)]
    writes = torch.zeros(2, grads[0].numel(), dtype=torch.int32) if count_writes else None
    call(schedules.tesloss_schedule_backward, code, tpr, ctypes.byref(rows),
         ctypes.c_void_p(row_stats.data_ptr()), ctypes.c_void_p(upstream.data_ptr()),
         *(ctypes.c_void_p(g[guard:].data_ptr()) for g in grads), ctypes.c_int64(guard),
         ctypes.c_void_p(writes.data_ptr() if count_writes else None))
    grad_vis, grad_txt = (g[guard:guard + batch * num_classes].view(batch, num_classes)
                          for g in grads)
    return (loss, grad_vis, grad_txt), writes


def check_against_reference(schedules, case, tpr, count_writes=False):
    dtype = case.vis_logits.dtype
    fused, writes = run_schedules(schedules, case, tpr, count_writes)
    in_dtype = run(reference_tes_loss, case) if dtype != torch.float64 else None
    assert_matches_reference(case, dtype, fused, in_dtype, where=f", {tpr} threads per row")
    return writes


@pytest.mark.parametrize("tpr", THREADS_PER_ROW)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@settings(max_examples=25)
@given(data=st.data())
def test_every_schedule_matches_the_fp64_reference(schedules, dtype, tpr, data):
    """test_fused_loss's property for each thread schedule, at the class counts a
    launch gives it."""
    check_against_reference(schedules, draw_case(data, dtype, max_b=16, max_c=MOST_CLASSES[tpr]),
                            tpr)


@pytest.mark.parametrize("tpr", THREADS_PER_ROW)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["text", "vision"])
def test_every_schedule_makes_subnormal_weights_normal_by_large_factors(schedules, which, dtype,
                                                                       tpr):
    check_against_reference(schedules, subnormal_weights_case(dtype, which), tpr)


@pytest.mark.parametrize("tpr", THREADS_PER_ROW)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_classes", EDGE_CLASSES)
@pytest.mark.parametrize("layout", ROW_LAYOUTS)
@pytest.mark.parametrize("target", EDGE_TARGETS)
def test_each_gradient_element_is_written_once(schedules, dtype, tpr, num_classes, layout,
                                               target):
    batch = 3  # the first row ignored: its zeros have a schedule of their own
    writes = check_against_reference(
        schedules, edge_case(dtype, num_classes, layout, batch, target), tpr, count_writes=True)
    for name, counts in zip(("grad vis_logits", "grad txt_logits"), writes):
        stray = int(counts[:GUARD].sum() + counts[-GUARD:].sum())
        assert stray == 0, f"{name}: {stray} writes outside the gradient"
        counts = counts[GUARD:-GUARD].view(batch, num_classes)
        wrong = (counts != 1).nonzero()
        assert len(wrong) == 0, (f"{name}: {len(wrong)} elements not written exactly once, "
                                 f"first [row, column] {wrong[0].tolist()} written "
                                 f"{int(counts[tuple(wrong[0])])} times")


@pytest.mark.parametrize("tpr", THREADS_PER_ROW)
@pytest.mark.parametrize("where", ["vis", "txt"])
@pytest.mark.parametrize("column", [1, 500, 1000])  # the head, the packs, the scalar rest
def test_every_schedule_carries_nan_to_the_loss_and_the_gradients(schedules, tpr, where,
                                                                   column):
    # fp32 rows one element past a 16-byte boundary: 3 head columns, 249 packs, 2 more.
    clean = edge_case(torch.float32, 1001, "offset 1", batch=4)
    case = edge_case(torch.float32, 1001, "offset 1", batch=4)
    (case.vis_logits if where == "vis" else case.txt_logits)[2, column] = math.nan
    fused, _ = run_schedules(schedules, case, tpr)
    expected = run_reference64(case)
    for name, f, e, scale in zip(("loss", "grad vis_logits", "grad txt_logits"), fused, expected,
                                 scales(clean)):
        assert torch.equal(torch.isnan(f), torch.isnan(e)), (
            f"{name}: nan where the reference has none, or none where it has")
        assert_close(f, e, TOLERANCES[torch.float32], scale, name)
