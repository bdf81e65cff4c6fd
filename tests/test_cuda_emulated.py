"""What only the emulated CUDA kernels can show: the launch shapes each batch
gets, how often each gradient element is written, that the order threads and
blocks run in changes no bit, and the same bits on devices of every size. The
properties every device has run on the emulated CUDA device too
(conftest.DEVICES); tests/emulated_cuda.py says what the emulator is and what it
cannot see.
"""
import re

import pytest
import torch
from cases import draw_case
from conftest import raw_params
from emulated_cuda import ORDERS, SIZES
from hypothesis import given, settings
from hypothesis import strategies as st

import tesloss
from tesloss.testing import (ALL_DTYPES, EDGE_TARGETS, FOUND_BY_FUZZ, FP64_RULE, ROW_LAYOUTS,
                             Tolerance, assert_close, assert_matches_reference, build_case,
                             edge_case, max_error, rule_bounds, run, run_reference64, scales)
from tesloss.reference import tes_loss as reference_tes_loss

pytestmark = pytest.mark.cuda_emulated

# (threads per row, B, C, emulated device size) that reach each launch shape of
# the forward and the backward, as tes_loss_cuda.cu chooses it
# (launch_shapes.h); the boosted rows are batches too small to fill the device.
LAUNCH_SHAPES = [
    (8, 37, 100, "1 SM"),
    (32, 37, 1000, "1 SM"),
    (128, 37, 4097, "1 SM"),
    (128, 3, 1000, "H200"),    # boosted from 32
    (512, 5, 20000, "H200"),
    (512, 3, 2048, "H200"),    # boosted from 128
    (512, 9, 9000, "1 SM, 512 threads"),  # one block, taking the rows in turns
]


def emulated_tes_loss(vis_logits, txt_logits, target, **kwargs):
    """fused_tes_loss's loss through the emulated CUDA kernels (tesloss_emulated)."""
    return torch.ops.tesloss_emulated.tes_loss_forward(vis_logits, txt_logits, target,
                                                       **raw_params(**kwargs))[0]


def emulated_two_passes(case):
    """Loss and both gradients from the forward's kernel, then the backward's, as
    fp16, tracing and a logit without grad still take them: a training step
    (`run`) takes the single pass's kernel instead, whose barrier before each
    row's gradients also hides a missing barrier in the forward's."""
    vis, txt = (x.detach() for x in case.leaves())
    params = raw_params(**case.kwargs)
    ops = torch.ops.tesloss_emulated
    loss, row_stats, batch_stats = ops.tes_loss_forward(vis, txt, case.target, **params)
    grads = ops.tes_loss_backward(case.grad_out.to(loss.dtype), vis, txt, case.target,
                                  row_stats, batch_stats, **params)
    return (loss, *grads)


ROW_KERNELS = ("tes_forward_kernel", "tes_step_kernel", "tes_backward_kernel")


def kernels_run(emulator):
    """{kernel's name without template arguments: threads per row (or None for
    the kernels that do not take rows in groups)}."""
    shapes = {}
    for kernel, blocks, threads in emulator.launches():
        name, _, args = kernel.partition("<")
        numbers = [int(x) for x in re.findall(r"\b\d+\b", args)]
        shapes[name] = numbers[-2] if name in ROW_KERNELS else None
    return shapes


def step_kernels(dtype, tpr):
    """What a training step launches: the single pass (its count of rows, its
    rows, the batch's sums, and the backward's scaling, read on the device), or
    for fp16, whose backward cannot read g on the host, the two passes."""
    if dtype == torch.float16:
        return {"tes_forward_kernel": tpr, "tes_finish_kernel": None, "tes_backward_kernel": tpr}
    return {"tes_count_kernel": None, "tes_step_kernel": tpr, "tes_finish_kernel": None,
            "tes_scale_kernel": None}


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


def check(emulator, case, dtype, size="H200", order="round robin"):
    emulator.configure(size, order)
    emulated = run(emulated_tes_loss, case, dtype)
    in_dtype = run(reference_tes_loss, case, dtype) if dtype != torch.float64 else None
    assert_matches_reference(case, dtype, emulated, in_dtype, where=f", emulated CUDA on {size}")
    assert_like_the_cpu_op(case, dtype, emulated, in_dtype)
    return emulated


# The suite's emulated CUDA device is an H200; these run on one multiprocessor
# of 512 threads, whose launches take the rows in turns with fewer threads each.
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@settings(max_examples=20)
@given(data=st.data())
def test_a_small_device_meets_the_rule_and_agrees_with_the_cpu_op(emulator, dtype, data):
    check(emulator, draw_case(data, dtype, max_b=16, max_c=20000), dtype, "1 SM, 512 threads")


@pytest.mark.parametrize("found", FOUND_BY_FUZZ)
def test_what_random_draws_found_on_a_small_device(emulator, found):
    dtype, drawn = FOUND_BY_FUZZ[found]
    check(emulator, build_case(dtype, **drawn), dtype, "1 SM, 512 threads")


@pytest.mark.parametrize("target", EDGE_TARGETS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("tpr, batch, num_classes, size", LAUNCH_SHAPES)
def test_every_launch_shape_runs_a_training_step(emulator, tpr, batch, num_classes, size, dtype,
                                                target):
    case = edge_case(dtype, num_classes, "offset 1", batch, target)
    check(emulator, case, dtype, size)
    assert kernels_run(emulator) == step_kernels(dtype, tpr)


@pytest.mark.parametrize("path", ["single pass", "two passes"])
@pytest.mark.parametrize("layout", ROW_LAYOUTS)
@pytest.mark.parametrize("target", EDGE_TARGETS)
@pytest.mark.parametrize("tpr, batch, num_classes, size",
                         [s for s in LAUNCH_SHAPES if s[2] <= 4097])
def test_each_gradient_element_is_written_exactly_once(emulator, tpr, batch, num_classes, size,
                                                       target, layout, path):
    case = edge_case(torch.float32, num_classes, layout, batch, target)  # every fifth row ignored
    emulator.configure(size, count_writes=True)
    if path == "single pass":
        run(emulated_tes_loss, case)
    else:
        emulated_two_passes(case)
    counts = emulator.write_counts().view(2, *case.shape)
    for name, count in zip(("grad vis_logits", "grad txt_logits"), counts):
        wrong = (count != 1).nonzero()
        assert len(wrong) == 0, (f"{name}: {len(wrong)} elements not written exactly once, first "
                                 f"[row, column] {wrong[0].tolist()} written "
                                 f"{int(count[tuple(wrong[0])])} times")


@pytest.mark.parametrize("path", ["single pass", "two passes"])
@pytest.mark.parametrize("tpr, batch, num_classes, size", LAUNCH_SHAPES)
def test_the_order_threads_and_blocks_run_in_changes_no_bit(emulator, tpr, batch, num_classes,
                                                            size, path):
    # Probability rows: the most fields go through the shuffles and shared memory.
    case = edge_case(torch.float32, num_classes, "contiguous", batch, "probs")
    results = {}
    for order in ORDERS:
        emulator.configure(size, order, seed=7)
        if path == "single pass":
            results[order] = run(emulated_tes_loss, case)
        else:
            results[order] = emulated_two_passes(case)
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
    for size in SIZES:
        emulator.configure(size)
        results[size] = run(emulated_tes_loss, case)
        assert kernels_run(emulator)["tes_step_kernel"] == 8
        blocks[size] = next(blocks for kernel, blocks, _ in emulator.launches()
                            if kernel.startswith("tes_step_kernel"))
    assert blocks == {"H200": 10, "1 SM": 8, "1 SM, 512 threads": 2}
    for size, outputs in results.items():
        for name, x, first in zip(("loss", "grad vis_logits", "grad txt_logits"), outputs,
                                  results["H200"]):
            assert torch.equal(x, first), f"{name} on {size} differs from the H200's"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_empty_batch_runs_the_finish_kernel_alone(emulator, reduction):
    emulator.configure()
    empty = torch.empty(0, 10)
    loss, row_stats, batch_stats = emulator.ops.tes_loss_forward(
        empty, empty, torch.empty(0, dtype=torch.long), **raw_params(reduction=reduction))
    assert [k.partition("<")[0] for k, _, _ in emulator.launches()] == ["tes_finish_kernel"]
    expected = torch.ops.tesloss.tes_loss_forward(
        empty, empty, torch.empty(0, dtype=torch.long), **raw_params(reduction=reduction))
    for x, e in zip((loss, row_stats, batch_stats), expected):
        assert x.shape == e.shape and torch.equal(torch.isnan(x), torch.isnan(e))
        assert torch.equal(x.nan_to_num(), e.nan_to_num())


@pytest.mark.parametrize("label", [100, -1, -101])
@pytest.mark.parametrize("tpr, batch, num_classes, size", LAUNCH_SHAPES[:3] + LAUNCH_SHAPES[4:5])
def test_a_label_out_of_range_trips_the_forward_device_assert(emulator, tpr, batch, num_classes,
                                                             size, label):
    case = edge_case(torch.float32, num_classes, "contiguous", batch)
    case.target[batch // 2] = label if label != 100 else num_classes
    emulator.configure(size)
    with pytest.raises(RuntimeError, match=r"device-side assert triggered: `ignored \|\| valid`"):
        emulated_tes_loss(case.vis_logits, case.txt_logits, case.target, **case.kwargs)


def test_a_label_out_of_range_trips_the_backward_device_assert(emulator):
    case = edge_case(torch.float32, 1000, "contiguous", 8)
    emulator.configure("1 SM")
    params = raw_params(**case.kwargs)
    loss, row_stats, batch_stats = emulator.ops.tes_loss_forward(
        case.vis_logits, case.txt_logits, case.target, **params)
    bad = case.target.clone()
    bad[3] = 1000
    with pytest.raises(RuntimeError, match=r"device-side assert triggered: .*is_valid_label"):
        emulator.ops.tes_loss_backward(
            torch.ones(()), case.vis_logits, case.txt_logits, bad, row_stats, batch_stats, **params)
