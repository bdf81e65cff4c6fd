#!/usr/bin/env python
"""Benchmark of the TeS loss: providers x shapes x dtypes x modes, checked, timed, written to CSV.

Providers
  tesloss        tesloss.fused_tes_loss, the fused op.
  eager          tesloss.reference.tes_loss, the recipe as users write it.
  torch_compile  torch.compile(reference.tes_loss, dynamic=False), compiled and warmed up
                 once per shape and dtype outside the timed region.
  liger          CUDA only: Liger-Kernel's losses composed into the TeS loss. The text term
                 is LigerCrossEntropyLoss on txt_logits / tau; the vision term is
                 CE(z, q) = KL(q || softmax z) + H(q), with LigerKLDIVLoss on log_softmax(z)
                 and the soft target q built under no_grad as the recipe builds it.
  A provider that cannot run (no compiled kernels for the device, torch.compile failing,
  Liger not importable) is skipped with a printed note.

Modes (inputs always require grad, as in training)
  forward   the loss call alone.
  backward  loss.backward() alone; the forward runs before the timed region, every call.
  full      forward and backward.
  Both logits get .grad = None before every call, so each call allocates fresh gradients.

Inputs: vis_logits ~ N(0, 2^2); txt_logits are cosine similarities in [-1, 1] between
normalized random image embeddings, pulled towards their label's class embedding, and
normalized random class embeddings; int64 labels with 5% of the rows ignored (-100);
tau, lambda_v and lambda_t at the recipe's defaults.

Correctness, before any timing: each provider's loss and both gradients are compared with
reference.tes_loss run in float64 on float64 copies of the same inputs:

    max_rel_err = max over x in (loss, grad_vis, grad_txt) of max|x - x64| / max|x64|

(a max-norm relative error; elementwise relative errors would be dominated by gradients that
are nearly 0). A provider above MAX_REL_ERR_GATE, or one that writes into its inputs, is
reported and not timed, and the script exits with status 1. The gate is MAX_REL_ERR_GATE for
fp32 and fp64; for bf16 and fp16 it is twice the error of the recipe computed in that dtype
(at least 1e-2), the tests' rule for half types.

Bytes model, the least traffic any implementation needs, with E the element size of the
logits' dtype:
    forward   reads vis_logits and txt_logits           2*B*C*E bytes
    backward  reads both again, writes both gradients   4*B*C*E bytes
    full      the sum                                    6*B*C*E bytes
Labels and O(B) statistics are left out. gbps = bytes / median time, so a provider that
moves more than this shows it as a lower gbps. pct_of_peak compares gbps with the copy
bandwidth measured in the same run (torch copy_ of a large buffer, read plus write bytes):
device-to-device on CUDA, memory-to-memory on the CPU.

Timing: after warm-up calls, the providers take turns, so load on a shared machine falls on
all of them alike; median, 20th and 80th percentiles of single calls are reported. On CUDA a
turn is one call. On the CPU a turn is RUN_LENGTH (10) calls in a row, so a provider runs with
its own code and data in the caches, as a loss does on logits just computed, instead of after
two other providers' calls have evicted them (one call per turn made every provider slower
here: tesloss at (256, 1000) took 0.211 ms instead of 0.167, eager 0.91 instead of 0.79).
  CPU   time.perf_counter around each call; caches are not flushed, so shapes whose inputs
        fit in the CPU caches run from them.
  CUDA  CUDA events around each call, started from an idle GPU (synchronized first), so the
        host-side cost of launching a provider's kernels counts. L2 is flushed (a buffer
        larger than L2 is zeroed) before each call when inputs and gradients would fit in
        twice the L2; the printed table says for which shapes. Peak memory is
        torch.cuda.max_memory_allocated during one extra call, minus what was allocated
        before it.

Allocator (CPU): glibc's malloc hands large blocks back to the kernel when they are freed
(munmap, heap trimming) by thresholds it adapts as the process runs, so whether a 1 MB
gradient lands on pages already mapped or on fresh ones that fault in (hundreds of page
faults, a third of a millisecond here) depends on the process's history: the same provider
measured 0.76 or 1.5 ms at (256, 1000) from one run to the next. The benchmark therefore
fixes the thresholds first (mallopt: mmap threshold 32 MiB, trim threshold 1 GiB), so
freed memory stays mapped, as in a training process that has run a while; every provider
gets the same allocator. --glibc-defaults leaves glibc's adaptive defaults.

Output: a table on stdout (with tesloss's speedup over each other provider), optionally a
Markdown table of the full-mode results (--markdown), and rows appended to a CSV (default
bench/results/bench_<device>.csv; the header is written only when the file is created).

Examples
  python bench/bench_loss.py                        # the default set for the device
  python bench/bench_loss.py --quick --device cpu   # a smoke run of a few seconds
  python bench/bench_loss.py --shapes 256x1000 --dtypes fp32,bf16 --modes full --markdown
"""
import argparse
import ctypes
import csv
import datetime
import gc
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tesloss
from tesloss import reference

CSV_COLUMNS = ["timestamp", "device", "device_name", "torch_version", "tesloss_version",
               "provider", "mode", "dtype", "B", "C", "median_ms", "p20_ms", "p80_ms", "gbps",
               "pct_of_peak", "peak_mem_mb", "max_rel_err"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
PROVIDERS = ("tesloss", "eager", "torch_compile", "liger")
MODES = ("forward", "backward", "full")
CPU_SHAPES = [(256, 100), (256, 1000), (1024, 1000), (256, 21843)]  # CIFAR-100, IN-1k, IN-21k
# The shapes GPU results are judged on first (B*C >= 2^26 for the last two), then the rest.
CUDA_SHAPES = [(256, 1000), (4096, 16384), (8192, 32768), (256, 100), (1024, 1000),
               (256, 21843)]
QUICK_SHAPES = [(256, 1000)]

# [B, C] element passes in the bytes model (see the docstring).
ELEMENT_PASSES = {"forward": 2, "backward": 4, "full": 6}

IGNORE_INDEX = -100
IGNORED_FRACTION = 0.05
VIS_STD = 2.0
EMBED_DIM = 64
# Weight of the label's class embedding in an image embedding: makes the text logits peak at
# the label, as a zero-shot text classifier's do, instead of being pure noise.
LABEL_PULL = 0.5

# A provider above its gate is not timed. For fp32 and fp64 the gate sits far above rounding,
# so only a wrong result trips it. bf16 and fp16 follow the tests' rule: at most twice the
# error of the recipe computed in that dtype (which rounds txt_logits / tau and the softmax
# to 8 or 11 bits, so its own error can exceed 1e-2), and never less than 1e-2.
MAX_REL_ERR_GATE = 1e-3
HALF_GATE_FACTOR, HALF_GATE_FLOOR = 2.0, 1e-2

# Adaptive repetitions: enough calls to fill about this many seconds per (shape, dtype, mode)
# across all providers, within [min, max].
REP_BUDGET_S = {"cpu": 1.5, "cuda": 0.5}
REP_RANGE = {"cpu": (10, 200), "cuda": (20, 200)}
RUN_LENGTH = {"cpu": 10, "cuda": 1}  # calls in a row per provider per turn (see Timing)
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}  # both well above the last-level cache


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for what is measured.")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", type=_choices(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all "
                             "that run on the device; --quick leaves out torch_compile)")
    parser.add_argument("--modes", type=_choices(MODES), help="default: forward,backward,full")
    parser.add_argument("--dtypes", type=_choices(DTYPES),
                        help="default: fp32,bf16 (and fp16 on CUDA); --quick: fp32")
    parser.add_argument("--shapes", type=_shapes, help="BxC,... e.g. 256x1000,256x21843")
    parser.add_argument("--reps", type=int,
                        help="timed calls per provider (default: adaptive, about "
                             f"{REP_BUDGET_S['cpu']} s per cell on CPU, {REP_BUDGET_S['cuda']} s "
                             "on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed calls per provider first "
                                                   "(default: 5 on CPU, 10 on CUDA; --quick: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in seconds: one shape (256x1000), fp32, 5 reps, "
                             "no torch_compile unless named in --providers")
    parser.add_argument("--out", type=Path, help="CSV to append to "
                                                 "(default: bench/results/bench_<device>.csv)")
    parser.add_argument("--markdown", action="store_true",
                        help="also print a Markdown table of the full-mode results")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's own choice). On a machine "
                             "shared with other work, fewer threads than cores avoids parallel "
                             "regions stalling on a descheduled thread")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="CPU: keep glibc malloc's adaptive mmap/trim thresholds instead of "
                             "fixing them (see Allocator above)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch reports no CUDA device")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.warmup is not None and args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (it also sizes the repetitions), got {args.warmup}")
    on_cuda = args.device == "cuda"
    if args.providers is None:
        args.providers = [p for p in PROVIDERS
                          if not (args.quick and p == "torch_compile")
                          and not (p == "liger" and not on_cuda)]
        if args.quick:
            print("note: --quick leaves out torch_compile (name it in --providers to include it)")
    args.modes = args.modes or list(MODES)
    if args.dtypes is None:
        args.dtypes = ["fp32"] if args.quick else ["fp32", "bf16"] + (["fp16"] if on_cuda else [])
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else (CUDA_SHAPES if on_cuda else CPU_SHAPES)
    if args.warmup is None:
        args.warmup = 2 if args.quick else (10 if on_cuda else 5)
    if args.reps is None and args.quick:
        args.reps = 5
    if args.out is None:
        args.out = Path(__file__).resolve().parent / "results" / f"bench_{args.device}.csv"
    return args


def _choices(allowed):
    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of "
                                             f"{','.join(allowed)}, got {text!r}")
        return names
    return parse


def _shapes(text):
    shapes = []
    for item in text.split(","):
        try:
            batch, num_classes = (int(n) for n in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a shape is BxC, e.g. 256x1000, got {item!r}")
        if batch < 1 or num_classes < 1:
            raise argparse.ArgumentTypeError(f"B and C must be >= 1, got {item!r}")
        shapes.append((batch, num_classes))
    return shapes


# ---------------------------------------------------------------------------------------------
# Machine


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Timer:
    """Times one call; everything that must not count (setup, freeing) stays outside."""

    def __init__(self, device):
        self.device = device
        self.flush_buffer = None
        if device == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.l2_bytes = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                                    "L2_cache_size", 0)
            size = max(256 << 20, 4 * self.l2_bytes)
            self.flush_buffer = torch.empty(size, dtype=torch.uint8, device="cuda")

    def measure(self, timed, state=None, flush=False):
        """Milliseconds taken by timed(state)."""
        if self.device == "cuda":
            if flush:
                self.flush_buffer.zero_()
            torch.cuda.synchronize()
            self.start.record()
            out = timed(state)
            self.end.record()
            self.end.synchronize()
            elapsed = self.start.elapsed_time(self.end)
        else:
            begin = time.perf_counter()
            out = timed(state)
            elapsed = (time.perf_counter() - begin) * 1e3
        del out  # freed after the clock stopped
        return elapsed


def keep_freed_memory_mapped():
    """Fixes glibc malloc's mmap and trim thresholds (see Allocator in the module docstring).
    Returns what the allocator line of the report says."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator: not glibc; left as it is"
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if not (mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)):
        return "allocator: glibc refused mallopt; left with its adaptive thresholds"
    return ("allocator: glibc malloc with fixed thresholds (mmap 32 MiB, trim 1 GiB), so "
            "freed memory stays mapped")


def copy_bandwidth_gbps(device, timer):
    """Bandwidth of torch copy_ between two buffers larger than the last-level cache."""
    nbytes = COPY_BYTES[device]
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [timer.measure(lambda _: dst.copy_(src)) for _ in range(10 if device == "cpu" else 30)]
    return 2 * nbytes / (median(times) * 1e-3) / 1e9


def median(values):
    return quantile(values, 0.5)


def quantile(values, q):
    return torch.tensor(values, dtype=torch.float64).quantile(q).item()


# ---------------------------------------------------------------------------------------------
# Inputs, reference and errors


def make_inputs(batch, num_classes, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    target = torch.randint(num_classes, (batch,), generator=gen, device=device)
    ignored = torch.rand(batch, generator=gen, device=device) < IGNORED_FRACTION
    ignored[0] = False  # at least one row counts, so "mean" is a number
    target = torch.where(ignored, IGNORE_INDEX, target)

    vis_logits = VIS_STD * torch.randn(batch, num_classes, generator=gen, device=device)
    class_embed = F.normalize(torch.randn(num_classes, EMBED_DIM, generator=gen, device=device),
                              dim=1)
    image_embed = torch.randn(batch, EMBED_DIM, generator=gen, device=device) / EMBED_DIM ** 0.5
    image_embed = image_embed + LABEL_PULL * class_embed[target.clamp(min=0)]
    txt_logits = F.normalize(image_embed, dim=1) @ class_embed.T
    return vis_logits.to(dtype), txt_logits.to(dtype), target


def evaluate(fn, vis_logits, txt_logits, target):
    """Loss and both gradients of one call, on leaves that require grad."""
    vis = vis_logits.detach().requires_grad_()
    txt = txt_logits.detach().requires_grad_()
    loss = fn(vis, txt, target)
    loss.backward()
    return loss.detach(), vis.grad, txt.grad


def max_rel_err(got, expected):
    worst = 0.0
    for value, exact in zip(got, expected):
        scale = exact.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        err = ((value.double() - exact).abs().max() / scale).item()
        if not math.isfinite(err):  # max() would let a nan through
            return math.inf
        worst = max(worst, err)
    return worst


# ---------------------------------------------------------------------------------------------
# Providers


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


def make_provider(name, device):
    """A provider's loss function (vis_logits, txt_logits, target) -> loss, or Unavailable.

    torch_compile gives None here: run_case compiles it per shape and dtype.
    """
    if name == "tesloss":
        info = tesloss.backend_info()
        if device not in info["devices"]:
            # Timing the fallback under the fused op's name would be a false number.
            raise Unavailable(f"the compiled extension has no {device} kernels "
                              f"(backend_info: {info})")
        return tesloss.fused_tes_loss
    if name == "eager":
        return reference.tes_loss
    if name == "torch_compile":
        return None
    if name == "liger":
        return make_liger_loss(device)
    raise ValueError(name)


def compile_reference():
    # A fresh dynamo cache per shape and dtype: with dynamic=False every new shape recompiles,
    # and past the recompile limit dynamo would quietly run the function eagerly.
    torch._dynamo.reset()
    return torch.compile(reference.tes_loss, dynamic=False)


def make_liger_loss(device):
    if device != "cuda":
        raise Unavailable("Liger-Kernel's Triton kernels need CUDA")
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
    except Exception as error:  # not installed, or built for another torch or triton
        raise Unavailable(f"liger_kernel is not importable ({type(error).__name__}: {error})")
    text_ce = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    vision_kl = LigerKLDIVLoss(reduction="sum", log_target=False)

    def liger_tes_loss(vis_logits, txt_logits, target, tau=0.03, lambda_v=0.1, lambda_t=0.3):
        valid = target != IGNORE_INDEX
        label = torch.where(valid, target, 0)
        logits_text = txt_logits / tau
        with torch.no_grad():
            soft_label = lambda_v * torch.softmax(logits_text, dim=1)
            soft_label[torch.arange(len(target), device=target.device), label] += 1.0 - lambda_v
            # An all-zero target row adds nothing to the KL sum and gets no gradient.
            soft_label *= valid.unsqueeze(1)
            # The KL kernel gives CE(z, q) - H(q); H(q) has no gradient but is in the loss.
            entropy = -torch.special.xlogy(soft_label, soft_label).sum(
                dtype=torch.promote_types(soft_label.dtype, torch.float32))
        loss_vision = vision_kl(F.log_softmax(vis_logits, dim=1), soft_label) + entropy
        # After soft_label: Liger writes its gradient into logits_text in place.
        loss_text = text_ce(logits_text, target)
        return loss_vision / valid.sum() + lambda_t * loss_text

    return liger_tes_loss


# ---------------------------------------------------------------------------------------------
# Timing


def mode_calls(mode, vis, txt, target):
    """(setup, timed) for a mode: setup(fn) runs untimed and returns the state timed() gets."""
    def setup(fn):
        vis.grad = None
        txt.grad = None
        return fn(vis, txt, target) if mode == "backward" else fn

    if mode == "forward":
        return setup, lambda fn: fn(vis, txt, target)  # the loss is freed untimed
    if mode == "backward":
        return setup, lambda loss: loss.backward()
    return setup, lambda fn: fn(vis, txt, target).backward()


def time_mode(mode, fns, inputs, timer, args, flush):
    """Per provider: the list of timed milliseconds, and peak memory (MB) or None."""
    setup, timed = mode_calls(mode, *inputs)
    times = {name: [] for name in fns}
    gc.collect()
    gc.disable()  # a collection inside a timed call would charge one provider for all
    try:
        for name, fn in fns.items():
            for _ in range(args.warmup):
                times[name].append(timer.measure(timed, setup(fn), flush))
        estimate = sum(median(t) for t in times.values())
        if args.reps is not None:
            reps = args.reps
        else:
            low, high = REP_RANGE[args.device]
            wanted = math.ceil(REP_BUDGET_S[args.device] * 1e3 / max(estimate, 1e-6))
            reps = min(high, max(low, wanted))
        times = {name: [] for name in fns}
        run_length = RUN_LENGTH[args.device]
        for _ in range(math.ceil(reps / run_length)):
            for name, fn in fns.items():
                for _ in range(run_length):
                    times[name].append(timer.measure(timed, setup(fn), flush))
    finally:
        gc.enable()
    peaks = {}
    for name, fn in fns.items():
        peaks[name] = peak_memory_mb(setup, timed, fn) if args.device == "cuda" else None
    return times, peaks


def peak_memory_mb(setup, timed, fn):
    state = setup(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = timed(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out, state
    return peak / 2**20


# ---------------------------------------------------------------------------------------------
# One shape and dtype


def run_case(batch, num_classes, dtype_name, providers, args, timer, copy_gbps):
    device, dtype = args.device, DTYPES[dtype_name]
    shape = f"{batch}x{num_classes}"
    vis, txt, target = make_inputs(batch, num_classes, dtype, device, args.seed)
    vis_saved, txt_saved = vis.clone(), txt.clone()
    expected = evaluate(reference.tes_loss, vis.double(), txt.double(), target)

    element_bytes = vis.element_size()
    working_set = 4 * batch * num_classes * element_bytes  # inputs and gradients
    flush = device == "cuda" and working_set <= 2 * timer.l2_bytes
    if device == "cuda":
        print(f"\n== {shape} {dtype_name}: L2 flush before each call: "
              f"{'yes' if flush else 'no'} (inputs+grads {working_set / 1e6:.1f} MB, "
              f"L2 {timer.l2_bytes / 1e6:.0f} MB)")
    else:
        print(f"\n== {shape} {dtype_name}")

    gate = MAX_REL_ERR_GATE
    if dtype in (torch.bfloat16, torch.float16):
        recipe_err = max_rel_err(evaluate(reference.tes_loss, vis, txt, target), expected)
        gate = max(HALF_GATE_FLOOR, HALF_GATE_FACTOR * recipe_err)
        print(f"   correctness gate: max_rel_err <= {gate:.2e} (the recipe computed in "
              f"{dtype_name} is off by {recipe_err:.2e})")

    fns, errors, failed = {}, {}, False
    for name, fn in providers.items():
        if name == "torch_compile":
            try:
                fn = compile_reference()
                begin = time.perf_counter()
                evaluate(fn, vis, txt, target)  # compiles forward and backward
                print(f"   torch_compile: compiled in {time.perf_counter() - begin:.1f} s")
            except Exception as error:
                print(f"   note: torch_compile skipped for {shape} {dtype_name}: "
                      f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                continue
        try:
            got = evaluate(fn, vis, txt, target)
        except Exception as error:
            print(f"   FAIL {name}: raised {type(error).__name__}: {error}; not timed")
            failed = True
            continue
        err = max_rel_err(got, expected)
        if not (torch.equal(vis, vis_saved) and torch.equal(txt, txt_saved)):
            print(f"   FAIL {name}: wrote into its input logits; not timed")
            with torch.no_grad():
                vis.copy_(vis_saved)
                txt.copy_(txt_saved)
            failed = True
            continue
        if not err <= gate:
            print(f"   FAIL {name}: max_rel_err {err:.3e} > {gate:.2e}; not timed")
            failed = True
            continue
        fns[name], errors[name] = fn, err
    del vis_saved, txt_saved, expected

    inputs = (vis.detach().requires_grad_(), txt.detach().requires_grad_(), target)
    results = []
    print(f"   {'mode':<9}{'provider':<15}{'median ms':>11}{'p20':>10}{'p80':>10}{'GB/s':>9}"
          f"{'% copy':>8}{'peak MB':>9}{'max_rel_err':>13}")
    for mode in args.modes:
        if not fns:
            break
        times, peaks = time_mode(mode, fns, inputs, timer, args, flush)
        nbytes = ELEMENT_PASSES[mode] * batch * num_classes * element_bytes
        for name in fns:
            mid = median(times[name])
            row = dict(provider=name, mode=mode, dtype=dtype_name, B=batch, C=num_classes,
                       median_ms=mid, p20_ms=quantile(times[name], 0.2),
                       p80_ms=quantile(times[name], 0.8), gbps=nbytes / (mid * 1e-3) / 1e9,
                       peak_mem_mb=peaks[name], max_rel_err=errors[name])
            row["pct_of_peak"] = 100 * row["gbps"] / copy_gbps
            results.append(row)
            peak = "" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.1f}"
            print(f"   {mode:<9}{name:<15}{mid:>11.4g}{row['p20_ms']:>10.4g}"
                  f"{row['p80_ms']:>10.4g}{row['gbps']:>9.3g}{row['pct_of_peak']:>8.1f}"
                  f"{peak:>9}{row['max_rel_err']:>13.2e}")
        print(f"   {'':<9}{speedup_line(times)}  ({len(times[next(iter(fns))])} reps)")
    return results, failed


def speedup_line(times):
    if "tesloss" not in times:
        return "(tesloss not timed: no ratios)"
    mine = median(times["tesloss"])
    others = [f"{median(t) / mine:.2f}x vs {name}"
              for name, t in times.items() if name != "tesloss"]
    return "tesloss " + (", ".join(others) if others else "alone")


# ---------------------------------------------------------------------------------------------
# Output


def check_csv(path):
    """Refuses, before any timing, a file that appending would corrupt."""
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as existing:
            header = next(csv.reader(existing), None)
        if header != CSV_COLUMNS:
            sys.exit(f"bench_loss: {path} has columns {header}, expected {CSV_COLUMNS}; "
                     f"choose another --out")


def append_csv(path, rows, machine):
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as out:
        writer = csv.writer(out)
        if new:
            writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([
                machine["timestamp"], machine["device"], machine["device_name"],
                machine["torch_version"], machine["tesloss_version"], row["provider"],
                row["mode"], row["dtype"], row["B"], row["C"], f"{row['median_ms']:.6g}",
                f"{row['p20_ms']:.6g}", f"{row['p80_ms']:.6g}", f"{row['gbps']:.4g}",
                f"{row['pct_of_peak']:.2f}",
                "" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.1f}",
                f"{row['max_rel_err']:.3e}",
            ])


def markdown_table(rows, machine, copy_gbps):
    full = [row for row in rows if row["mode"] == "full"]
    if not full:
        return "(no full-mode results for the Markdown table)"
    labels = {"tesloss": "tesloss", "eager": "eager", "torch_compile": "torch.compile",
              "liger": "Liger"}
    present = [name for name in PROVIDERS if any(row["provider"] == name for row in full)]
    peers = [name for name in present if name != "tesloss"]
    header = (["shape (B×C)", "dtype"] + [f"{labels[name]} ms" for name in present]
              + [f"vs {labels[name]}" for name in peers if "tesloss" in present]
              + (["tesloss GB/s (% of copy)"] if "tesloss" in present else []))
    turns = ("one call per turn" if RUN_LENGTH[machine["device"]] == 1
             else f"turns of {RUN_LENGTH[machine['device']]} calls")
    lines = [f"Forward + backward, median of single calls, providers taking {turns}; "
             f"{machine['device_name']}, "
             f"{machine['threads']}, torch {machine['torch_version']}, "
             f"copy bandwidth {copy_gbps:.1f} GB/s.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cases = []
    for row in full:
        if (row["B"], row["C"], row["dtype"]) not in cases:
            cases.append((row["B"], row["C"], row["dtype"]))
    for batch, num_classes, dtype_name in cases:
        by_provider = {row["provider"]: row for row in full
                       if (row["B"], row["C"], row["dtype"]) == (batch, num_classes, dtype_name)}
        cells = [f"{batch}×{num_classes}", dtype_name]
        cells += [f"{by_provider[name]['median_ms']:.3g}" if name in by_provider else "–"
                  for name in present]
        mine = by_provider.get("tesloss")
        if "tesloss" in present:
            cells += [f"{by_provider[name]['median_ms'] / mine['median_ms']:.1f}×"
                      if mine and name in by_provider else "–" for name in peers]
            cells.append(f"{mine['gbps']:.3g} ({mine['pct_of_peak']:.0f}%)" if mine else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    check_csv(args.out)
    device = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device == "cpu":
        allocator = ("allocator: glibc's adaptive defaults (--glibc-defaults)"
                     if args.glibc_defaults else keep_freed_memory_mapped())
    timer = Timer(device)
    n_threads = torch.get_num_threads()
    threads = (f"{n_threads} thread{'s' if n_threads > 1 else ''}" if device == "cpu"
               else f"CUDA {torch.version.cuda}")
    machine = dict(timestamp=datetime.datetime.now(datetime.timezone.utc)
                   .isoformat(timespec="seconds"),
                   device=device, device_name=device_name(device),
                   torch_version=torch.__version__, tesloss_version=tesloss.__version__,
                   threads=threads)
    copy_gbps = copy_bandwidth_gbps(device, timer)

    print(f"tesloss {tesloss.__version__} benchmark on {device} ({machine['device_name']}, "
          f"{threads}), torch {torch.__version__}")
    print("bytes model: forward reads vis and txt (2*B*C elements), backward reads both and "
          "writes both gradients (4*B*C), full = 6*B*C; GB/s = bytes / median time")
    print(f"% copy: against torch copy_ of {COPY_BYTES[device] >> 20} MiB "
          f"({'device to device' if device == 'cuda' else 'memory to memory'}, read + write "
          f"bytes) measured now: {copy_gbps:.1f} GB/s")
    if device == "cuda":
        print("timing: CUDA events from an idle GPU, launch overhead included; median and "
              "p20/p80 over interleaved calls")
    else:
        print(f"timing: perf_counter per call, no cache flush (shapes that fit in the CPU caches "
              f"run from them, so % copy can pass 100); providers take turns of "
              f"{RUN_LENGTH['cpu']} calls; median and p20/p80 of single calls")
    if device == "cpu":
        print(allocator)
    print("max_rel_err: max over loss, grad_vis, grad_txt of max|x - x64| / max|x64| against "
          "the float64 reference on the same inputs")

    providers = {}
    for name in args.providers:
        try:
            providers[name] = make_provider(name, device)
        except Unavailable as why:
            print(f"note: {name} skipped: {why}")

    rows, failed = [], False
    for batch, num_classes in args.shapes:
        for dtype_name in args.dtypes:
            case_rows, case_failed = run_case(batch, num_classes, dtype_name, providers, args,
                                              timer, copy_gbps)
            # Each case's rows are written as soon as they exist, so a run cut short by a
            # time limit (as on a lent GPU) keeps what it measured.
            append_csv(args.out, case_rows, machine)
            rows += case_rows
            failed |= case_failed
            if device == "cuda":
                torch.cuda.empty_cache()  # the next shape should not inherit this one's blocks

    print(f"\n{len(rows)} rows appended to {args.out}")
    if args.markdown:
        print()
        print(markdown_table(rows, machine, copy_gbps))
    if failed:
        print("some providers failed their correctness check (FAIL above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
