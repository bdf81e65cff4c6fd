"""The CUDA kernels: the CPU suite's properties on the device, agreement with
the CPU kernels, and what only a GPU has: streams, graph capture, launch
counts, bitwise determinism across blocks, and device-side label asserts.

Every value is checked against ``tesloss.reference.tes_loss`` run in float64,
with conftest's one tolerance table and half-type rule.
"""
import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (ALL_DTYPES, EDGE_CLASSES, HALF_DTYPES, ROW_LAYOUTS, SPOT_CHECK, TOLERANCES,
                      Case, Tolerance, assert_close, assert_matches_reference, draw_case,
                      edge_case, run, scales)
from hypothesis import given, settings
from hypothesis import strategies as st

import tesloss
from tesloss import _ops
from tesloss.reference import tes_loss as reference_tes_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _cuda_kernels():
    # Without CUDA kernels fused_tes_loss falls back to the reference, and
    # these tests would compare the reference with itself.
    if not _ops.has_kernel("cuda"):
        message = (f"tesloss._C has no CUDA kernels ({_ops.LOAD_ERROR or 'built without CUDA'}); "
                   "build where nvcc is found, or with FORCE_CUDA=1")
        if _ops.extension_required():
            pytest.fail(message)
        pytest.skip(message)


def on_device(x, dtype=None, device="cuda"):
    """A leaf copy of x on `device`, cast to `dtype`, with x's strides and storage
    offset, so row-strided and misaligned rows stay that way."""
    dtype = dtype or x.dtype
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=dtype, device=device)
    extent = x.storage_offset() + sum((n - 1) * s for n, s in zip(x.shape, x.stride())) + 1
    flat = torch.zeros(extent, dtype=dtype, device=device)
    out = flat.as_strided(x.shape, x.stride(), x.storage_offset())
    out.copy_(x)
    return out.detach()


def run_cuda(loss_fn, case, dtype=None, **extra):
    """Loss and both gradients on the GPU, inputs in their CPU layout; results on the CPU."""
    vis = on_device(case.vis_logits, dtype).requires_grad_()
    txt = on_device(case.txt_logits, dtype).requires_grad_()
    loss = loss_fn(vis, txt, case.target.cuda(), **case.kwargs, **extra)
    loss.backward(on_device(case.grad_out, loss.dtype))
    return loss.detach().cpu(), vis.grad.cpu(), txt.grad.cpu()


def check_against_reference(case, dtype):
    fused = run_cuda(tesloss.fused_tes_loss, case, dtype)
    in_dtype = run_cuda(reference_tes_loss, case, dtype) if dtype in HALF_DTYPES else None
    assert_matches_reference(case, dtype, fused, in_dtype, where=", cuda")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@settings(max_examples=50)
@given(data=st.data())
def test_values_and_gradients_match_the_fp64_reference(dtype, data):
    check_against_reference(draw_case(data, dtype), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_classes", EDGE_CLASSES)
@pytest.mark.parametrize("layout", ROW_LAYOUTS)
def test_every_launch_shape_and_row_layout(dtype, num_classes, layout):
    check_against_reference(edge_case(dtype, num_classes, layout), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@settings(max_examples=40)
@given(data=st.data())
def test_cpu_and_cuda_agree(dtype, data):
    case = draw_case(data, dtype, max_c=4096)
    cpu = run(tesloss.fused_tes_loss, case, dtype)
    gpu = run_cuda(tesloss.fused_tes_loss, case, dtype)
    names = ("loss", "grad vis_logits", "grad txt_logits")
    full = TOLERANCES[torch.float32 if dtype in HALF_DTYPES else dtype]
    # Each kernel is within `full` of the reference, so within twice it of the other;
    # half-type gradients round fp32 values that close to each other, so they may
    # differ by one unit in the last place of that type.
    both = Tolerance(rtol=2 * full.rtol, atol=2 * full.atol)
    for i, (name, c, g, scale) in enumerate(zip(names, cpu, gpu, scales(case))):
        tol = both if (i == 0 or dtype not in HALF_DTYPES) else Tolerance(
            rtol=torch.finfo(dtype).eps, atol=2 * full.atol)
        assert_close(g, c.double(), tol, scale, f"{name}: cuda against cpu ({dtype})")

    # The raw op: every row statistic, the count of rows not ignored, the parts.
    args = (case.kwargs["tau"], case.kwargs["lambda_v"], case.kwargs["lambda_t"],
            case.kwargs["ignore_index"], {"none": 0, "mean": 1, "sum": 2}[case.kwargs["reduction"]])
    _, rows_cpu, batch_cpu = torch.ops.tesloss.tes_loss_forward(
        case.vis_logits, case.txt_logits, case.target, *args)
    _, rows_gpu, batch_gpu = torch.ops.tesloss.tes_loss_forward(
        on_device(case.vis_logits), on_device(case.txt_logits), case.target.cuda(), *args)
    rows_gpu, batch_gpu = rows_gpu.cpu(), batch_gpu.cpu()
    assert rows_gpu.dtype == rows_cpu.dtype and batch_gpu.dtype == batch_cpu.dtype
    assert batch_gpu[0] == batch_cpu[0], "count of rows not ignored"
    ignored = case.target == case.kwargs["ignore_index"]
    assert torch.equal(rows_gpu[ignored], torch.zeros_like(rows_gpu[ignored]))
    loss_scale = scales(dataclasses.replace(
        case, kwargs={**case.kwargs, "reduction": "none"},
        grad_out=torch.ones(case.shape[0], dtype=torch.float64)))[0]
    assert_close(rows_gpu, rows_cpu.double(), both, loss_scale[:, None],
                 "row_stats: cuda against cpu")
    mean_scale = float(loss_scale.mean()) if case.shape[0] else 1.0
    assert_close(batch_gpu, batch_cpu.double(), both, mean_scale, "batch_stats: cuda against cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=30)
@given(data=st.data())
def test_parts_are_the_batch_means_of_the_reference_parts(dtype, data):
    case = draw_case(data, dtype, max_b=16, max_c=2048)
    with torch.no_grad():
        _, parts = tesloss.fused_tes_loss(on_device(case.vis_logits), on_device(case.txt_logits),
                                          case.target.cuda(), **case.kwargs, return_parts=True)
        _, ref = reference_tes_loss(*case.leaves(torch.float64), case.target, **case.kwargs,
                                    return_parts=True)
    as_mean = dataclasses.replace(case, kwargs={**case.kwargs, "reduction": "mean"},
                                  grad_out=torch.tensor(1.0, dtype=torch.float64))
    for name in ("ce_vision", "kl_ref", "ce_text"):
        got = getattr(parts, name)
        assert got.is_cuda and not got.requires_grad
        assert_close(got.cpu(), getattr(ref, name), TOLERANCES[dtype], scales(as_mean)[0],
                     f"parts.{name} (cuda)")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_gradients_that_are_not_one(reduction):
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
    check_against_reference(case, torch.float64)
    check_against_reference(case, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    vis = torch.randn(5, 700, device="cuda", requires_grad=True)
    txt = torch.randn(5, 700, device="cuda", requires_grad=True)
    target = torch.full((5,), -100, device="cuda")
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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    vis = torch.randn(0, 10, device="cuda", requires_grad=True)
    txt = torch.randn(0, 10, device="cuda", requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device="cuda")
    loss = tesloss.fused_tes_loss(vis, txt, target, reduction=reduction)
    ref = reference_tes_loss(vis.detach(), txt.detach(), target, reduction=reduction)
    torch.testing.assert_close(loss.detach(), ref, equal_nan=True)
    _, _, batch_stats = torch.ops.tesloss.tes_loss_forward(vis, txt, target, 0.03, 0.1, 0.3,
                                                           -100, 1)
    assert batch_stats[0] == 0 and torch.isnan(batch_stats[1:]).all()
    loss.sum().backward()
    assert vis.grad.shape == (0, 10) and txt.grad.shape == (0, 10)


@pytest.mark.parametrize("num_classes", [40, 1000, 2048, 20000])
def test_masked_classes_add_nothing(num_classes):
    # Classes masked with -inf in both logits (whole 16-column chunks, a whole
    # thread's share, the last columns) have p_v = p_ref = 0: the loss is the
    # loss over the other classes, and their gradients are exactly 0.
    gen = torch.Generator().manual_seed(num_classes)
    vis = torch.randn(6, num_classes, generator=gen, dtype=torch.float64)
    txt = torch.rand(6, num_classes, generator=gen, dtype=torch.float64) * 2 - 1
    masked = torch.zeros(num_classes, dtype=torch.bool)
    masked[16:48] = True
    masked[num_classes // 2: num_classes // 2 + 1024] = True
    masked[-20:] = True
    keep = (~masked).nonzero()[:, 0]
    target = keep[torch.randint(0, len(keep), (6,), generator=gen)]
    vis[:, masked] = -math.inf
    txt[:, masked] = -math.inf
    kwargs = dict(tau=0.05, lambda_v=0.3, lambda_t=0.4, reduction="none")
    sub_target = torch.searchsorted(keep, target)
    for dtype in (torch.float64, torch.float32):
        v = vis.to("cuda", dtype, copy=True).requires_grad_()
        t = txt.to("cuda", dtype, copy=True).requires_grad_()
        loss, parts = tesloss.fused_tes_loss(v, t, target.cuda(), **kwargs, return_parts=True)
        loss.sum().backward()
        v_ref, t_ref = (x[:, keep].clone().requires_grad_() for x in (vis, txt))
        ref = reference_tes_loss(v_ref, t_ref, sub_target, **kwargs)
        ref.sum().backward()
        table = TOLERANCES[dtype]  # atol times 10: the losses here are about 10
        tol = dict(rtol=table.rtol, atol=10 * table.atol)
        torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), **tol)
        assert all(torch.isfinite(p) for p in parts)
        assert torch.equal(v.grad[:, masked.cuda()].cpu(), torch.zeros(6, int(masked.sum()),
                                                                       dtype=dtype))
        assert torch.equal(t.grad[:, masked.cuda()].cpu(), torch.zeros(6, int(masked.sum()),
                                                                       dtype=dtype))
        torch.testing.assert_close(v.grad[:, keep.cuda()].cpu().double(), v_ref.grad, **tol)
        torch.testing.assert_close(t.grad[:, keep.cuda()].cpu().double(), t_ref.grad, **tol)


def test_strided_target_reads_the_labels_it_is_given():
    vis = torch.randn(40, 100, device="cuda")
    txt = torch.randn(40, 100, device="cuda")
    labels = torch.randint(0, 100, (80,), device="cuda")
    labels[::6] = -100
    strided_target = labels[::2]
    assert strided_target.stride(0) == 2
    for reduction in ("mean", "none"):
        a = torch.ops.tesloss.tes_loss_forward(vis, txt, strided_target, 0.03, 0.1, 0.3, -100,
                                               {"mean": 1, "none": 0}[reduction])
        b = torch.ops.tesloss.tes_loss_forward(vis, txt, strided_target.contiguous(), 0.03, 0.1,
                                               0.3, -100, {"mean": 1, "none": 0}[reduction])
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_label_gradient_is_computed_before_rounding_to_bf16():
    vis = torch.zeros(1, 8, dtype=torch.bfloat16, device="cuda")
    vis[0, 3] = 12.0
    vis.requires_grad_()
    txt = torch.zeros(1, 8, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    target = torch.tensor([3], device="cuda")
    tesloss.fused_tes_loss(vis, txt, target, lambda_v=0.0, lambda_t=0.0).backward()
    p_label = torch.softmax(vis.detach().double(), 1)[0, 3]
    assert vis.grad[0, 3] != 0
    assert vis.grad[0, 3] == (p_label - 1).to(torch.bfloat16)


@pytest.mark.parametrize("where", ["vis", "txt"])
def test_nan_in_the_logits_reaches_the_loss(where):
    vis, txt = torch.randn(4, 1500, device="cuda"), torch.randn(4, 1500, device="cuda")
    (vis if where == "vis" else txt)[2, 1200] = math.nan
    target = torch.tensor([1, 2, 3, 4], device="cuda")
    losses = tesloss.fused_tes_loss(vis, txt, target, reduction="none")
    assert torch.isnan(losses[2]) and torch.isfinite(losses[[0, 1, 3]]).all()


def test_the_callers_tensors_are_never_written():
    vis = torch.randn(30, 1001, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    txt = torch.randn(30, 1001, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 1001, (30,), device="cuda")
    before = [x.detach().clone() for x in (vis, txt, target)]
    tesloss.fused_tes_loss(vis, txt, target).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, (vis.detach(), txt.detach(), target)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 131072), (300_000, 10), (20_000, 1000), (1500, 9000)])
def test_large_shapes(dtype, shape):
    # C = 131072 takes a block per row; the large batches take several sweeps of
    # the grid over the rows, and many per-block partial sums.
    batch, num_classes = shape
    gen = torch.Generator(device="cuda").manual_seed(batch + num_classes)
    vis = torch.randn(batch, num_classes, generator=gen, device="cuda", dtype=torch.float64) * 3
    txt = torch.rand(batch, num_classes, generator=gen, device="cuda", dtype=torch.float64) * 2 - 1
    target = torch.randint(0, num_classes, (batch,), generator=gen, device="cuda")
    target[::9] = -100
    case = Case(vis.to(dtype), txt.to(dtype), target,
                torch.tensor(1.0, dtype=torch.float64, device="cuda"),
                dict(tau=0.03, lambda_v=0.1, lambda_t=0.3, ignore_index=-100, reduction="mean"))
    check_against_reference(case, dtype)


def _forward_backward(vis, txt, target, reduction="mean"):
    loss, parts = tesloss.fused_tes_loss(vis, txt, target, reduction=reduction,
                                         return_parts=True)
    grads = torch.autograd.grad(loss, (vis, txt), torch.ones_like(loss))
    return (loss.detach(), *parts, *grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(256, 1000), (40_000, 1000), (300, 20000), (100_000, 37)])
def test_bitwise_deterministic(dtype, shape):
    gen = torch.Generator(device="cuda").manual_seed(0)
    vis = torch.randn(*shape, generator=gen, device="cuda").to(dtype).requires_grad_()
    txt = torch.rand(*shape, generator=gen, device="cuda").to(dtype).requires_grad_()
    target = torch.randint(0, shape[1], (shape[0],), generator=gen, device="cuda")
    target[::7] = -100
    for reduction in ("mean", "none"):
        first = _forward_backward(vis, txt, target, reduction)
        for _ in range(2):
            again = _forward_backward(vis, txt, target, reduction)
            for a, b in zip(first, again):
                assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_capture_and_replay(dtype):
    # The count of rows not ignored changes between capture and replay: a
    # backward that read it on the host at capture time would keep the old one.
    batch, num_classes = 256, 1000
    vis = torch.randn(batch, num_classes, device="cuda").to(dtype).requires_grad_()
    txt = torch.rand(batch, num_classes, device="cuda").to(dtype).requires_grad_()
    target = torch.randint(0, num_classes, (batch,), device="cuda")

    def step():
        loss, parts = tesloss.fused_tes_loss(vis, txt, target, return_parts=True)
        return (loss, *parts, *torch.autograd.grad(loss, (vis, txt)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    for seed, ignored_every in ((1, 3), (2, 1000)):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            vis.copy_(torch.randn(batch, num_classes, generator=gen, device="cuda"))
            txt.copy_(torch.rand(batch, num_classes, generator=gen, device="cuda"))
            target.copy_(torch.randint(0, num_classes, (batch,), generator=gen, device="cuda"))
            target[::ignored_every] = -100
        graph.replay()
        eager = step()
        for name, a, b in zip(("loss", "ce_vision", "kl_ref", "ce_text", "grad vis", "grad txt"),
                              static_out, eager):
            assert torch.equal(a, b), f"{name}: graph replay differs from eager"
        ref = reference_tes_loss(vis.detach().double(), txt.detach().double(), target)
        torch.testing.assert_close(static_out[0].double(), ref, rtol=SPOT_CHECK["loss"].rtol, atol=SPOT_CHECK["loss"].atol)


def test_runs_on_the_current_stream():
    # The side stream sleeps, then overwrites the inputs: kernels launched on any
    # other stream would read the old inputs before the overwrite lands.
    batch, num_classes = 512, 1000
    old = torch.randn(batch, num_classes, device="cuda")
    new = torch.randn(batch, num_classes, device="cuda") * 3
    txt = torch.rand(batch, num_classes, device="cuda")
    target = torch.randint(0, num_classes, (batch,), device="cuda")
    vis = old.clone().requires_grad_()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        with torch.no_grad():
            vis.copy_(new)
        loss = tesloss.fused_tes_loss(vis, txt, target)
        (grad_vis,) = torch.autograd.grad(loss, (vis,))
    side.synchronize()
    ref_vis = new.double().requires_grad_()
    ref = reference_tes_loss(ref_vis, txt.double(), target)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=TOLERANCES[torch.float32].rtol, atol=TOLERANCES[torch.float32].atol)
    torch.testing.assert_close(grad_vis.double(), ref_vis.grad, rtol=SPOT_CHECK["grad"].rtol, atol=SPOT_CHECK["grad"].atol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_inputs_device_not_the_current_one():
    vis = torch.randn(64, 1000, device="cuda:1", requires_grad=True)
    txt = torch.rand(64, 1000, device="cuda:1")
    target = torch.randint(0, 1000, (64,), device="cuda:1")
    with torch.cuda.device(0):
        loss = tesloss.fused_tes_loss(vis, txt, target)
        loss.backward()
    ref = reference_tes_loss(vis.detach().double(), txt.double(), target)
    assert loss.device == vis.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(loss.double(), ref, rtol=TOLERANCES[torch.float32].rtol, atol=TOLERANCES[torch.float32].atol)


def test_forward_and_backward_are_three_kernel_launches():
    # The forward's row kernel and batch finish, then the backward's one kernel:
    # no copies, casts, fills or host round trips at the benchmark's shape.
    vis = torch.randn(256, 1000, device="cuda", requires_grad=True)
    txt = torch.rand(256, 1000, device="cuda", requires_grad=True)
    target = torch.randint(0, 1000, (256,), device="cuda")
    grad_out = torch.ones((), device="cuda")
    _forward_backward(vis, txt, target)  # warm up: allocator, lazy init
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        loss = tesloss.fused_tes_loss(vis, txt, target)
        torch.autograd.grad(loss, (vis, txt), grad_out)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        pytest.skip("the profiler recorded no CUDA activity here")
    ours = ("tes_forward_kernel", "tes_finish_kernel", "tes_backward_kernel")
    counts = {kernel: sum(kernel in name for name in kernels) for kernel in ours}
    assert len(kernels) == 3 and all(n == 1 for n in counts.values()), kernels


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_on_cuda(reduction, dtype):
    gen = torch.Generator().manual_seed(0)
    vis = (torch.randn(6, 13, generator=gen) * 2).to(dtype).cuda().requires_grad_()
    txt = (torch.rand(6, 13, generator=gen) * 2 - 1).to(dtype).cuda().requires_grad_()
    target = torch.randint(0, 13, (6,), generator=gen).cuda()
    target[1] = -100
    args = (vis, txt, target, 0.03, 0.1, 0.3, -100, reduction)
    torch.library.opcheck(torch.ops.tesloss.tes_loss_forward.default, args)
    loss, row_stats, batch_stats = torch.ops.tesloss.tes_loss_forward(*args)
    backward_args = (torch.ones_like(loss), vis.detach(), txt.detach(), target, row_stats,
                     batch_stats, 0.03, 0.1, 0.3, -100, reduction)
    torch.library.opcheck(torch.ops.tesloss.tes_loss_backward.default, backward_args)


_BAD_LABEL_SCRIPT = textwrap.dedent("""
    import sys, torch, tesloss
    label, op = int(sys.argv[1]), sys.argv[2]
    vis = torch.randn(4, 10, device="cuda")
    txt = torch.randn(4, 10, device="cuda")
    good = torch.tensor([1, 2, 3, 4], device="cuda")
    bad = torch.tensor([1, 2, label, 4], device="cuda")
    if op == "forward":
        torch.ops.tesloss.tes_loss_forward(vis, txt, bad, 0.03, 0.1, 0.3, -100, 1)
    else:
        loss, rows, stats = torch.ops.tesloss.tes_loss_forward(vis, txt, good, 0.03, 0.1, 0.3,
                                                               -100, 1)
        torch.ops.tesloss.tes_loss_backward(torch.ones_like(loss), vis, txt, bad, rows, stats,
                                            0.03, 0.1, 0.3, -100, 1)
    torch.cuda.synchronize()
    print("NO ERROR")
""")


@pytest.mark.parametrize("label, op", [(10, "forward"), (-5, "forward"), (10, "backward")])
def test_out_of_range_labels_trigger_a_device_side_assert(label, op):
    # A device-side assert leaves the CUDA context unusable, so it runs in a child.
    proc = subprocess.run([sys.executable, "-c", _BAD_LABEL_SCRIPT, str(label), op],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "device-side assert" in proc.stderr or "Assertion" in proc.stderr, proc.stderr[-2000:]
