"""A short benchmark: forward + backward of the fused op beside the recipe in
eager PyTorch and under torch.compile, with a copy of as many bytes as the op
must move, all measured in one run on one device."""
import time

import torch
from torch.utils import benchmark

from ..functional import fused_tes_loss
from ..reference import tes_loss as reference_tes_loss
from .progress import Progress

# (batch, classes) per device type: a small batch, and one that fills memory's bandwidth.
SHAPES = {"cpu": [(256, 1000), (2048, 1000)],
          "cuda": [(256, 1000), (4096, 16384), (8192, 32768)]}
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}
# Seconds of timed calls per measurement (torch.utils.benchmark's blocked_autorange).
MIN_RUN_TIME_S = 0.3


def _median_ms(step):
    # With the process's thread count: Timer's default of one thread would time the
    # CPU single-threaded, and its switch recompiles torch.compile's function (its
    # guards hold the thread count) until the recompile limit leaves it eager.
    timer = benchmark.Timer(stmt="step()", globals={"step": step},
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=MIN_RUN_TIME_S).median * 1e3


def _providers(compile_recipe):
    providers = {"tesloss": fused_tes_loss, "eager": reference_tes_loss}
    if compile_recipe:  # one compile per cell, within dynamo's recompile limit of 8
        providers["torch.compile"] = torch.compile(reference_tes_loss, dynamic=False)
    return providers


def _copy_ms(numel, dtype, device):
    """A copy of `numel` elements, device memory to device memory."""
    source = torch.empty(numel, dtype=dtype, device=device)
    copy = torch.empty_like(source)
    return _median_ms(lambda: copy.copy_(source))


def _cell(device, batch, num_classes, dtype, providers, progress):
    """One shape and dtype: a row per provider. Its tensors go when it returns."""
    gen = torch.Generator().manual_seed(0)
    vis = torch.randn(batch, num_classes, generator=gen).to(device, dtype).requires_grad_()
    txt = (torch.rand(batch, num_classes, generator=gen) * 2 - 1).to(device, dtype)
    txt.requires_grad_()
    target = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    # The fewest bytes forward + backward can move: both logits read twice, both
    # gradients written; a copy of half as many elements moves as many.
    moved = 6 * vis.numel() * vis.element_size()
    copy_ms = _copy_ms(3 * vis.numel(), dtype, device)
    rows = []
    for name, loss_fn in providers.items():
        def step(loss_fn=loss_fn):
            return torch.autograd.grad(loss_fn(vis, txt, target), (vis, txt))
        start = time.perf_counter()
        step()  # the first call: compiles, for torch.compile
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        first_call = time.perf_counter() - start
        ms = _median_ms(step)
        rows.append({"shape": [batch, num_classes], "dtype": str(dtype).replace("torch.", ""),
                     "provider": name, "median_ms": round(ms, 4),
                     "gbps": round(moved / (ms * 1e-3) / 1e9, 2),
                     "copy_pct": round(100 * copy_ms / ms, 1),
                     "first_call_s": round(first_call, 2)})
        progress.step(f"{name} {batch}x{num_classes} {dtype}")
    return rows


def run_benchmark(device, compile_recipe=True):
    """[{shape, dtype, provider, median_ms, gbps, copy_pct, first_call_s}], one per cell."""
    kind = torch.device(device).type
    cells = [(s, d) for s in SHAPES[kind] for d in DTYPES[kind]]
    providers = _providers(compile_recipe)
    progress = Progress(f"{device} speed", len(cells) * len(providers))
    rows = []
    for (batch, num_classes), dtype in cells:
        rows += _cell(device, batch, num_classes, dtype, providers, progress)
    progress.close()
    return rows
