"""What only a GPU has: agreement of the CUDA kernels with the CPU kernels,
graph capture, streams, several devices, launch counts, and device-side label
asserts. The properties both devices share are in the other test files, run
on every device (conftest.DEVICES); `pytest -m cuda` selects both parts.
"""
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from cases import draw_case
from conftest import SPOT_CHECK, TOLERANCES, raw_forward
from hypothesis import given, settings
from hypothesis import strategies as st

import tesloss
from tesloss import _ops
from tesloss.reference import tes_loss as reference_tes_loss
from tesloss.testing import ALL_DTYPES, HALF_DTYPES, Tolerance, assert_close, on_device, run, scales

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

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


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@settings(max_examples=40)
@given(data=st.data())
def test_cpu_and_cuda_agree(dtype, data):
    case = draw_case(data, dtype, max_c=4096)
    cpu = run(tesloss.fused_tes_loss, case, dtype)
    gpu = run(tesloss.fused_tes_loss, case, dtype, "cuda")
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
    _, rows_cpu, batch_cpu = raw_forward(case.vis_logits, case.txt_logits, case.target,
                                         **case.kwargs)
    _, rows_gpu, batch_gpu = raw_forward(on_device(case.vis_logits, "cuda"),
                                         on_device(case.txt_logits, "cuda"), case.target.cuda(),
                                         **case.kwargs)
    rows_gpu, batch_gpu = rows_gpu.cpu(), batch_gpu.cpu()
    assert rows_gpu.dtype == rows_cpu.dtype and batch_gpu.dtype == batch_cpu.dtype
    num_valid = _ops.BATCH_STATS.index("num_valid")
    assert batch_gpu[num_valid] == batch_cpu[num_valid], "count of rows not ignored"
    ignored = case.target == case.kwargs["ignore_index"]
    assert torch.equal(rows_gpu[ignored], torch.zeros_like(rows_gpu[ignored]))
    loss_scale = scales(dataclasses.replace(
        case, kwargs={**case.kwargs, "reduction": "none"},
        grad_out=torch.ones(case.shape[0], dtype=torch.float64)))[0]
    assert_close(rows_gpu, rows_cpu.double(), both, loss_scale[:, None],
                 "row_stats: cuda against cpu")
    mean_scale = float(loss_scale.mean()) if case.shape[0] else 1.0
    assert_close(batch_gpu, batch_cpu.double(), both, mean_scale, "batch_stats: cuda against cpu")


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
        for name, a, b in zip(("loss", *tesloss.Parts._fields, "grad vis", "grad txt"),
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


def test_a_training_step_is_four_kernel_launches():
    # The single pass's count of rows, its row kernel and batch finish, then the
    # backward's scaling, which reads g = 1 and leaves: no copies, casts, fills
    # or host round trips at the benchmark's shape.
    vis = torch.randn(256, 1000, device="cuda", requires_grad=True)
    txt = torch.rand(256, 1000, device="cuda", requires_grad=True)
    target = torch.randint(0, 1000, (256,), device="cuda")
    grad_out = torch.ones((), device="cuda")
    tesloss.fused_tes_loss(vis, txt, target).backward()  # warm up: allocator, lazy init
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
    ours = ("tes_count_kernel", "tes_step_kernel", "tes_finish_kernel", "tes_scale_kernel")
    counts = {kernel: sum(kernel in name for name in kernels) for kernel in ours}
    assert len(kernels) == 4 and all(n == 1 for n in counts.values()), kernels


_BAD_LABEL_SCRIPT = textwrap.dedent("""
    import sys, torch, tesloss
    from conftest import raw_backward, raw_forward
    label, op = int(sys.argv[1]), sys.argv[2]
    vis = torch.randn(4, 10, device="cuda")
    txt = torch.randn(4, 10, device="cuda")
    good = torch.tensor([1, 2, 3, 4], device="cuda")
    bad = torch.tensor([1, 2, label, 4], device="cuda")
    if op == "forward":
        raw_forward(vis, txt, bad)
    else:
        loss, rows, stats = raw_forward(vis, txt, good)
        raw_backward(torch.ones_like(loss), vis, txt, bad, rows, stats)
    torch.cuda.synchronize()
    print("NO ERROR")
""")


@pytest.mark.parametrize("label, op", [(10, "forward"), (-5, "forward"), (10, "backward")])
def test_out_of_range_labels_trigger_a_device_side_assert(label, op):
    # A device-side assert leaves the CUDA context unusable, so it runs in a child.
    proc = subprocess.run([sys.executable, "-c", _BAD_LABEL_SCRIPT, str(label), op],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.join(ROOT, "tests"))
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "device-side assert" in proc.stderr or "Assertion" in proc.stderr, proc.stderr[-2000:]
