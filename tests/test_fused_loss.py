"""The fused op against the published recipe, on every device: values, both
gradients, parts, and the edge cases of F.cross_entropy's conventions.

Hypothesis draws shapes (B in [1, 64], C in [1, 4096]), tau, the lambdas,
reductions, ignored rows, row-strided, transposed and misaligned layouts,
upstream gradients that are not 1, and extreme and very negative logits; fixed
cases add every class count the kernels treat apart (vector widths, blocks,
the CUDA launch shapes) in every row layout, large batches and wide rows.
"""
import dataclasses
import math

import pytest
import torch
from cases import draw_case
from conftest import TOLERANCES, check_against_reference, for_the_emulator, raw_forward
from emulated_cuda import runs_cuda_kernels
from hypothesis import given
from hypothesis import strategies as st

import tesloss
from tesloss.reference import tes_loss as reference_tes_loss
from tesloss.testing import (ALL_DTYPES, Case, EDGE_CLASSES, EDGE_TARGETS, HALF_DTYPES, ROW_LAYOUTS,
                             assert_close, edge_case, scales)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(data=st.data())
def test_values_and_gradients_match_the_fp64_reference(device, dtype, data):
    check_against_reference(draw_case(data, dtype, max_c=4096), dtype, device)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@given(data=st.data())
def test_half_types_err_at_most_twice_the_reference_in_that_dtype(device, dtype, data):
    check_against_reference(draw_case(data, dtype, max_c=4096), dtype, device)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_classes", EDGE_CLASSES)
@pytest.mark.parametrize("layout", ROW_LAYOUTS)
@pytest.mark.parametrize("target", EDGE_TARGETS)
def test_every_class_count_the_kernels_treat_apart_in_every_row_layout(device, dtype,
                                                                       num_classes, layout,
                                                                       target):
    check_against_reference(edge_case(dtype, num_classes, layout, target=target), dtype, device)


# (shape, the emulator's): on CUDA, C = 131072 takes a block per row; the large
# batches take several sweeps of the grid over the rows, and many per-block
# partial sums. The emulated H200 sweeps 33792 rows of C = 10 at once and 8448
# of C = 1000, so fewer rows still take several sweeps there.
LARGE_SHAPES = [((16, 131072), (16, 131072)), ((300_000, 10), (70_000, 10)),
                ((20_000, 1000), (9_000, 1000)), ((1500, 9000), (300, 9000))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, emulated", LARGE_SHAPES)
def test_large_shapes(device, dtype, shape, emulated):
    batch, num_classes = for_the_emulator(device, shape, emulated)
    gen = torch.Generator().manual_seed(batch + num_classes)
    vis = torch.randn(batch, num_classes, generator=gen, dtype=torch.float64) * 3
    txt = torch.rand(batch, num_classes, generator=gen, dtype=torch.float64) * 2 - 1
    target = torch.randint(0, num_classes, (batch,), generator=gen)
    target[::9] = -100
    case = Case(vis.to(dtype), txt.to(dtype), target, torch.tensor(1.0, dtype=torch.float64),
                dict(tau=0.03, lambda_v=0.1, lambda_t=0.3, ignore_index=-100, reduction="mean"))
    check_against_reference(case, dtype, device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_gradients_that_are_not_one(device, reduction):
    gen = torch.Generator().manual_seed(3)
    vis = torch.randn(50, 300, generator=gen, dtype=torch.float64) * 3
    txt = torch.rand(50, 300, generator=gen, dtype=torch.float64) * 2 - 1
    target = torch.randint(0, 300, (50,), generator=gen)
    target[7] = -100
    # Per-row upstream gradients of both signs, from a strided view: a kernel that
    # read them with the wrong stride or as one scalar gets these rows wrong.
    grad_out = (torch.randn(100, generator=gen, dtype=torch.float64)[::2] if reduction == "none"
                else torch.tensor(-2.5, dtype=torch.float64))
    case = Case(vis, txt, target, grad_out, dict(tau=0.05, lambda_v=0.2, lambda_t=0.5,
                                                  ignore_index=-100, reduction=reduction))
    check_against_reference(case, torch.float64, device)
    check_against_reference(case, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(data=st.data())
def test_parts_are_the_batch_means_of_the_reference_parts(device, dtype, data):
    case = draw_case(data, dtype, max_b=16, max_c=512)
    with torch.no_grad():
        _, parts = tesloss.fused_tes_loss(*case.leaves(device=device), case.target.to(device),
                                          **case.kwargs, return_parts=True)
        _, ref = reference_tes_loss(*case.leaves(torch.float64), case.target, **case.kwargs,
                                    return_parts=True)
    as_mean = dataclasses.replace(case, kwargs={**case.kwargs, "reduction": "mean"},
                                  grad_out=torch.tensor(1.0, dtype=torch.float64))
    loss_scale = scales(as_mean)[0]
    for name in tesloss.Parts._fields:
        got = getattr(parts, name)
        assert got.device == torch.device(device) and not got.requires_grad
        assert_close(got.cpu(), getattr(ref, name), TOLERANCES[dtype], loss_scale,
                     f"parts.{name}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(device, reduction):
    vis = torch.randn(5, 700, device=device, requires_grad=True)
    txt = torch.randn(5, 700, device=device, requires_grad=True)
    target = torch.full((5,), -100, device=device)
    loss, parts = tesloss.fused_tes_loss(vis, txt, target, reduction=reduction,
                                         return_parts=True)
    expected = {"mean": torch.tensor(math.nan), "sum": torch.tensor(0.0),
                "none": torch.zeros(5)}[reduction]
    torch.testing.assert_close(loss.detach().cpu(), expected, equal_nan=True)
    assert all(torch.isnan(p) for p in parts), "means over zero rows are nan"
    loss.sum().backward()
    # Ignored rows never read the upstream gradient, not even mean's 1 / 0.
    assert torch.equal(vis.grad, torch.zeros_like(vis))
    assert torch.equal(txt.grad, torch.zeros_like(txt))


def test_mean_over_all_ignored_rows_is_nan_like_cross_entropy(device):
    vis = torch.randn(3, 4, device=device)
    target = torch.full((3,), -100, device=device)
    ours = tesloss.fused_tes_loss(vis, torch.randn(3, 4, device=device), target, lambda_v=0.0,
                                  lambda_t=0.0)
    theirs = torch.nn.functional.cross_entropy(vis, target)
    assert torch.isnan(ours) and torch.isnan(theirs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(device, reduction):
    vis = torch.randn(0, 10, device=device, requires_grad=True)
    txt = torch.randn(0, 10, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    loss = tesloss.fused_tes_loss(vis, txt, target, reduction=reduction)
    ref = reference_tes_loss(vis.detach(), txt.detach(), target, reduction=reduction)
    torch.testing.assert_close(loss.detach(), ref, equal_nan=True)
    _, _, batch_stats = raw_forward(vis, txt, target, reduction=reduction)
    num_valid = tesloss._ops.BATCH_STATS.index("num_valid")
    assert batch_stats[num_valid] == 0
    assert torch.isnan(batch_stats[num_valid + 1:]).all(), "means over zero rows are nan"
    loss.sum().backward()
    assert vis.grad.shape == (0, 10) and txt.grad.shape == (0, 10)


def test_a_strided_target_is_read_through_its_stride(device):
    vis = torch.randn(40, 100, device=device)
    txt = torch.randn(40, 100, device=device)
    labels = torch.randint(0, 100, (80,), device=device)
    labels[::6] = -100
    strided_target = labels[::2]
    assert strided_target.stride(0) == 2
    for reduction in ("mean", "none"):
        a = raw_forward(vis, txt, strided_target, reduction=reduction)
        b = raw_forward(vis, txt, strided_target.contiguous(), reduction=reduction)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("column_from_end", [13, 1])  # in a whole vector; in the last, partial one
@pytest.mark.parametrize("num_classes", [33, 1000, 2500])
@pytest.mark.parametrize("where", ["vis", "txt"])
def test_nan_in_the_logits_reaches_the_loss_and_the_gradients(device, where, num_classes,
                                                              column_from_end):
    gen = torch.Generator().manual_seed(num_classes)
    vis = torch.randn(4, num_classes, generator=gen)
    txt = torch.rand(4, num_classes, generator=gen) * 2 - 1
    target = torch.tensor([1, 2, 3, 4])
    clean = Case(vis.clone(), txt.clone(), target, torch.ones(4, dtype=torch.float64),
                 dict(tau=0.03, lambda_v=0.1, lambda_t=0.3, ignore_index=-100,
                      reduction="none"))
    (vis if where == "vis" else txt)[2, num_classes - column_from_end] = math.nan
    assert torch.isnan(tesloss.fused_tes_loss(vis.to(device), txt.to(device), target.to(device)))
    got = run_plain(tesloss.fused_tes_loss, vis.to(device), txt.to(device), target.to(device))
    expected = run_plain(reference_tes_loss, vis.double(), txt.double(), target)
    assert torch.isnan(got[0][2]) and torch.isfinite(got[0][[0, 1, 3]]).all()
    for name, g, e, scale in zip(("loss", "grad vis_logits", "grad txt_logits"), got, expected,
                                 scales(clean)):
        assert torch.equal(torch.isnan(g), torch.isnan(e)), f"{name}: nan where the reference has"
        assert_close(g, e, TOLERANCES[torch.float32], scale, name)  # nan matches nan there


def run_plain(loss_fn, vis, txt, target):
    vis, txt = vis.clone().requires_grad_(), txt.clone().requires_grad_()
    losses = loss_fn(vis, txt, target, reduction="none")
    losses.sum().backward()
    return losses.detach().cpu(), vis.grad.cpu(), txt.grad.cpu()


# fp32 takes the vector exp, which must give exp(-inf) = 0 with no nan on the way.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_text_classes_give_a_finite_loss_and_kl(device, dtype):
    # -inf text logits (classes masked out of the reference) have p_ref = 0.
    vis, txt = torch.randn(4, 40, dtype=dtype), torch.randn(4, 40, dtype=dtype)
    txt[:, 30:] = -math.inf
    target = torch.tensor([0, 5, 29, 7])
    loss, parts = tesloss.fused_tes_loss(vis.to(device), txt.to(device), target.to(device),
                                         return_parts=True)
    ref = reference_tes_loss(vis.double(), txt.double(), target)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=tol.rtol, atol=tol.atol)
    assert all(torch.isfinite(p) for p in parts)


# Which classes are masked with -inf in both logits: (C, masked columns). Whole
# CPU blocks and CUDA chunks, a whole CUDA thread's share, and the last columns.
MASKS = {
    "the last 10 of 40": (40, [slice(30, None)]),
    "from column 16 of 40": (40, [slice(16, None)]),
    "from the second CPU block on": (3000, [slice(1024, None)]),
    "from inside the first CPU block on": (3000, [slice(900, None)]),
    "chunks, a middle block and the tail of 1000": (1000, [slice(16, 48), slice(500, 1000),
                                                           slice(-20, None)]),
    "chunks and the second half of 2048": (2048, [slice(16, 48), slice(1024, None)]),
    "chunks, a middle block and the tail of 20000": (20000, [slice(16, 48), slice(10000, 11024),
                                                             slice(-20, None)]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask", MASKS)
def test_classes_masked_in_both_logits_add_nothing(device, dtype, mask):
    # A class masked in both logits has p_v = p_ref = 0: the loss is the loss
    # over the other classes, and the masked classes' gradients are exactly 0.
    num_classes, masked_slices = MASKS[mask]
    masked = torch.zeros(num_classes, dtype=torch.bool)
    for columns in masked_slices:
        masked[columns] = True
    keep = (~masked).nonzero()[:, 0]
    gen = torch.Generator().manual_seed(num_classes)
    vis = torch.randn(6, num_classes, generator=gen, dtype=torch.float64).to(dtype)
    txt = (torch.rand(6, num_classes, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    target = keep[torch.randint(0, len(keep), (6,), generator=gen)]
    vis[:, masked] = -math.inf
    txt[:, masked] = -math.inf
    kwargs = dict(tau=0.05, lambda_v=0.3, lambda_t=0.4, reduction="none")
    v, t = (x.to(device).requires_grad_() for x in (vis, txt))
    loss, parts = tesloss.fused_tes_loss(v, t, target.to(device), **kwargs, return_parts=True)
    loss.sum().backward()
    kept = [x.detach()[:, keep].double().requires_grad_() for x in (vis, txt)]
    expected = reference_tes_loss(*kept, torch.searchsorted(keep, target), **kwargs)
    expected.sum().backward()
    table = TOLERANCES[dtype]  # atol times 10: the losses here are about 10
    tol = dict(rtol=table.rtol, atol=10 * table.atol)
    torch.testing.assert_close(loss.detach().cpu().double(), expected.detach(), **tol)
    assert all(torch.isfinite(p) for p in parts)
    for full, part in zip((v, t), kept):
        grad = full.grad.cpu()
        assert torch.equal(grad[:, masked], torch.zeros_like(grad[:, masked]))
        torch.testing.assert_close(grad[:, keep].double(), part.grad, **tol)


def test_the_label_gradient_is_computed_before_rounding_to_bf16(device, request):
    # With a confident model p_v[y] ~ 1 and p_v[y] - 1 is tiny: rounding p_v
    # to bf16 first (Liger-Kernel #1329) would make the gradient 0.
    if runs_cuda_kernels(device):
        # Found 2026-12-04, once the emulated device really ran (EmulatedCuda's
        # __eq__): the CUDA forward's bf16 sum of exponentials is 1.0000432730
        # where the CPU's is 1.0000430346 (fp32 logits give the CPU's on both),
        # so the label's gradient is 2 bf16 ulps off. Within the accuracy rule;
        # the cause is not known yet.
        request.applymarker(pytest.mark.xfail(strict=True, reason="CUDA bf16 row sum"))
    vis = torch.zeros(1, 8, dtype=torch.bfloat16, device=device)
    vis[0, 3] = 12.0
    vis.requires_grad_()
    txt = torch.zeros(1, 8, dtype=torch.bfloat16, device=device, requires_grad=True)
    target = torch.tensor([3], device=device)
    tesloss.fused_tes_loss(vis, txt, target, lambda_v=0.0, lambda_t=0.0).backward()
    p_label = torch.softmax(vis.detach().double(), 1)[0, 3]
    assert vis.grad[0, 3] != 0
    assert vis.grad[0, 3] == (p_label - 1).to(torch.bfloat16)


def _forward_backward(vis, txt, target, reduction):
    loss, parts = tesloss.fused_tes_loss(vis, txt, target, reduction=reduction,
                                         return_parts=True)
    grads = torch.autograd.grad(loss, (vis, txt), torch.ones_like(loss))
    return (loss.detach(), *parts, *grads)


# (shape, the emulator's). The emulator runs threads and blocks in one fixed
# order, so there a rerun's bits show only that no uninitialized memory is
# read: smaller shapes that reach the same launch shapes do that (the orders
# themselves are test_cuda_emulated.py's).
DETERMINISM_SHAPES = [((300, 1001), (300, 1001)), ((40_000, 1000), (2_000, 1000)),
                      ((300, 20000), (100, 20000)), ((100_000, 37), (9_000, 37))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, emulated", DETERMINISM_SHAPES)
def test_results_are_bitwise_deterministic(device, dtype, shape, emulated):
    # Three runs; on the CPU with at least two threads and then with one, so the
    # result must not depend on how rows are split between threads either (a test
    # worker may run with one thread: conftest.py).
    shape = for_the_emulator(device, shape, emulated)
    gen = torch.Generator().manual_seed(0)
    vis = torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()
    txt = torch.rand(*shape, generator=gen).to(device, dtype).requires_grad_()
    target = torch.randint(0, shape[1], (shape[0],), generator=gen).to(device)
    target[::7] = -100
    threads = torch.get_num_threads()
    try:
        for reduction in ("mean", "none"):
            first = _forward_backward(vis, txt, target, reduction)
            for run_threads in (max(threads, 2), 1):
                torch.set_num_threads(run_threads)
                again = _forward_backward(vis, txt, target, reduction)
                for a, b in zip(first, again):
                    assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads)
