"""The correctness checks: the sweep of tesloss.testing held to the rule on a
device, and on CUDA what only a GPU has: a CUDA graph's capture and replay, a
second stream, and the device-side assert a bad label trips (in a child
process, as it leaves the CUDA context unusable)."""
import subprocess
import sys
import time

import torch

from ..functional import fused_tes_loss
from ..testing import check_against_reference, edge_case, on_device
from ..testing.sweep import sweep
from .progress import Progress


def _outcome(name, dtype, run):
    start = time.perf_counter()
    try:
        run()
        error = None
    except AssertionError as failure:
        error = str(failure)
    except Exception as failure:  # a crash is a failure of the case, reported with the rest
        error = f"{type(failure).__name__}: {failure}"
    return {"case": name, "dtype": str(dtype).replace("torch.", "") if dtype else None,
            "passed": error is None, "error": error,
            "seconds": round(time.perf_counter() - start, 3)}


def run_sweep(device, only=None):
    """Each sweep case on `device` (those whose name holds `only`, if given), held to
    the rule: [{case, dtype, passed, error, seconds}]."""
    cases = [case for case in sweep() if only is None or only in case.name]
    progress = Progress(f"{device} correctness", len(cases))
    results = []
    for case in cases:
        results.append(_outcome(case.name, case.dtype, lambda c=case: check_against_reference(
            c.build(), c.dtype, device)))
        progress.step(case.name)
    progress.close()
    return results


def _inputs(device, batch=64, num_classes=1000):
    case = edge_case(torch.float32, num_classes, "contiguous", batch)
    vis, txt = case.leaves(torch.float32, device)
    return vis, txt, on_device(case.target, device), case.kwargs


def _step(vis, txt, target, kwargs):
    loss = fused_tes_loss(vis, txt, target, **kwargs)
    return (loss, *torch.autograd.grad(loss, (vis, txt)))


def _assert_same(got, expected, what):
    for name, a, b in zip(("loss", "grad vis_logits", "grad txt_logits"), got, expected):
        assert torch.equal(a, b), f"{what}: {name} differs from the eager run on the default stream"


def _graph_replay(device):
    vis, txt, target, kwargs = _inputs(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up off the capture, as torch.cuda.graphs asks
        _step(vis, txt, target, kwargs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _step(vis, txt, target, kwargs)
    with torch.no_grad():  # new inputs in the captured tensors, then a replay
        vis.mul_(1.5)
        txt.add_(0.25)
    graph.replay()
    torch.cuda.synchronize(device)
    _assert_same(static, _step(vis, txt, target, kwargs), "CUDA graph replay")


def _second_stream(device):
    vis, txt, target, kwargs = _inputs(device)
    expected = _step(vis, txt, target, kwargs)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        got = _step(vis, txt, target, kwargs)
    torch.cuda.synchronize(device)
    _assert_same(got, expected, "a second stream")


_BAD_LABEL = """
import sys, torch, tesloss
device = sys.argv[1]
vis = torch.randn(4, 10, device=device, requires_grad=True)
target = torch.tensor([0, 1, 10, 2], device=device)
tesloss.fused_tes_loss(vis, vis.detach(), target).backward()
torch.cuda.synchronize(device)
print("NO ERROR")
"""


def _device_assert(device):
    child = subprocess.run([sys.executable, "-c", _BAD_LABEL, device], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode != 0 and "NO ERROR" not in child.stdout, (
        "a label out of range ran without an error")
    assert "device-side assert" in child.stderr or "Assertion" in child.stderr, (
        f"a label out of range failed, but not with a device-side assert: {child.stderr[-500:]}")


CUDA_ONLY = {"CUDA graph capture and replay": _graph_replay,
             "a second stream": _second_stream,
             "a bad label's device-side assert (child process)": _device_assert}


def run_cuda_only(device):
    return [_outcome(name, None, lambda f=check: f(device)) for name, check in CUDA_ONLY.items()]
