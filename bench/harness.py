"""The benchmark harness: correctness gate, timing, memory, the machine's load and
self-consistency checks. Loss-agnostic: bench_loss.py supplies the providers and inputs,
report.py writes what they measured.

A provider is a function (vis_logits, txt_logits, target) -> loss. Every call runs on leaves
that require grad, as in training. docs/DESIGN.md says why the timing is done as it is.
"""
import contextlib
import ctypes
import gc
import math
import os
import platform
import resource
import time

import torch

MODES = ("forward", "backward", "full")

# Adaptive repetitions: enough calls to fill about this many seconds per (shape, dtype, mode)
# across all providers, within [min, max].
REP_BUDGET_S = {"cpu": 1.5, "cuda": 0.5}
REP_RANGE = {"cpu": (10, 200), "cuda": (20, 200)}
# Calls in a row per provider per turn: on the CPU a provider then runs with its own code
# and data in the caches, as a loss does on logits just computed.
RUN_LENGTH = {"cpu": 10, "cuda": 1}
COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}  # both well above the last-level cache

# Figures that contradict themselves: forward + backward far from full, or a spread of
# single calls (p80 / p20) so wide that the median means little. Healthy runs stay well
# inside both (docs/DESIGN.md).
SUM_OF_PARTS_RANGE = (0.75, 1.33)
MAX_SPREAD = 3.0


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


def keep_freed_memory_mapped():
    """Fixes glibc malloc's mmap and trim thresholds, so freed memory stays mapped and no
    provider's gradients land on fresh pages by the process's history. Returns what the
    allocator line of the report says."""
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


class Timer:
    """Times one call; everything that must not count (setup, freeing) stays outside."""

    def __init__(self, device):
        self.device = device
        self.l2_bytes = 0
        if device == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.l2_bytes = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                                    "L2_cache_size", 0)
            size = max(256 << 20, 4 * self.l2_bytes)
            self.flush_buffer = torch.empty(size, dtype=torch.uint8, device="cuda")

    def measure(self, timed, state=None, flush=False):
        """Milliseconds taken by timed(state). On CUDA, from an idle GPU (so the host-side
        cost of launching counts), after zeroing a buffer larger than L2 if `flush`."""
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


class MachineLoad:
    """How busy the machine was with other work while the benchmark ran: the CPU time that
    others took (all CPU time in /proc/stat less this process's) and the time the
    hypervisor stole, each as CPUs' worth over the wall time. None where /proc/stat is
    missing (not Linux)."""

    def __init__(self):
        self.begin = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as stat:
                fields = [int(n) for n in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks
        steal = fields[7] / ticks if len(fields) > 7 else 0.0
        return time.monotonic(), busy - steal, steal, MachineLoad._own_cpu_seconds(ticks)

    @staticmethod
    def _own_cpu_seconds(ticks):
        """CPU time of this process, its reaped children and its living descendants
        (torch.compile's compile workers among them)."""
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        parents, times = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone, or not readable
            # After the command's ")": state ppid ... utime (12th) stime (13th).
            parents[int(entry)] = int(fields[1])
            times[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
        me = os.getpid()
        for pid in times:
            ancestor = parents.get(pid)
            while ancestor not in (None, 0, 1, me):
                ancestor = parents.get(ancestor)
            if ancestor == me:
                total += times[pid]
        return total

    def cpus_used(self):
        """(others, steal) in CPUs since construction, or None."""
        end = self._sample()
        if self.begin is None or end is None or end[0] <= self.begin[0]:
            return None
        wall = end[0] - self.begin[0]
        others = (end[1] - self.begin[1]) - (end[3] - self.begin[3])
        return max(others, 0.0) / wall, (end[2] - self.begin[2]) / wall


def copy_bandwidth_gbps(device, timer):
    """Bandwidth of torch copy_ between two buffers larger than the last-level cache, read
    plus write bytes: the "% of copy" reference."""
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
# Correctness gate


def evaluate(fn, vis_logits, txt_logits, target):
    """Loss and both gradients of one call, on leaves that require grad."""
    vis = vis_logits.detach().requires_grad_()
    txt = txt_logits.detach().requires_grad_()
    loss = fn(vis, txt, target)
    loss.backward()
    return loss.detach(), vis.grad, txt.grad


def max_rel_err(got, expected):
    """max over (loss, grad_vis, grad_txt) of max|x - x64| / max|x64|: a max-norm relative
    error, since elementwise ones would be dominated by gradients that are nearly 0."""
    worst = 0.0
    for value, exact in zip(got, expected):
        scale = exact.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        err = ((value.double() - exact).abs().max() / scale).item()
        if not math.isfinite(err):  # max() would let a nan through
            return math.inf
        worst = max(worst, err)
    return worst


def gate(name, fn, inputs, expected, limit):
    """The provider's max_rel_err if it passes, else None with the reason printed: it
    raised, wrote into its inputs, or erred by more than `limit`."""
    vis, txt, target = inputs
    saved = vis.clone(), txt.clone()
    try:
        got = evaluate(fn, vis, txt, target)
    except Exception as error:
        print(f"   FAIL {name}: raised {type(error).__name__}: {error}; not timed")
        return None
    if not (torch.equal(vis, saved[0]) and torch.equal(txt, saved[1])):
        print(f"   FAIL {name}: wrote into its input logits; not timed")
        with torch.no_grad():
            vis.copy_(saved[0])
            txt.copy_(saved[1])
        return None
    err = max_rel_err(got, expected)
    if not err <= limit:
        print(f"   FAIL {name}: max_rel_err {err:.3e} > {limit:.2e}; not timed")
        return None
    return err


# ---------------------------------------------------------------------------------------------
# Timing


def mode_calls(mode, vis, txt, target):
    """(setup, timed) for a mode: setup(fn) runs untimed and returns the state timed() gets.
    Both logits get .grad = None first, so each call allocates fresh gradients."""
    def setup(fn):
        vis.grad = None
        txt.grad = None
        return fn(vis, txt, target) if mode == "backward" else fn

    if mode == "forward":
        return setup, lambda fn: fn(vis, txt, target)  # the loss is freed untimed
    if mode == "backward":
        return setup, lambda loss: loss.backward()
    return setup, lambda fn: fn(vis, txt, target).backward()


def time_mode(mode, fns, inputs, timer, warmup, reps=None, flush=False):
    """Per provider: the timed milliseconds of single calls, and the peak memory of one
    more call (MB). After `warmup` calls each, the providers take turns, so load on a shared
    machine falls on all of them alike."""
    device = timer.device
    setup, timed = mode_calls(mode, *inputs)
    times = {name: [] for name in fns}
    gc.collect()
    gc.disable()  # a collection inside a timed call would charge one provider for all
    try:
        for name, fn in fns.items():
            for _ in range(warmup):
                times[name].append(timer.measure(timed, setup(fn), flush))
        if reps is None:
            low, high = REP_RANGE[device]
            estimate = sum(median(t) for t in times.values())
            reps = min(high, max(low, math.ceil(REP_BUDGET_S[device] * 1e3 / max(estimate, 1e-6))))
        times = {name: [] for name in fns}
        for _ in range(math.ceil(reps / RUN_LENGTH[device])):
            for name, fn in fns.items():
                for _ in range(RUN_LENGTH[device]):
                    times[name].append(timer.measure(timed, setup(fn), flush))
    finally:
        gc.enable()
    peak = cuda_peak_memory_mb if device == "cuda" else cpu_peak_memory_mb
    peaks = {name: peak(setup, timed, fn) for name, fn in fns.items()}
    return times, peaks


def cuda_peak_memory_mb(setup, timed, fn):
    """torch.cuda.max_memory_allocated during one call, minus what was allocated before it."""
    state = setup(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = timed(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out, state
    return peak / 2**20


def cpu_peak_memory_mb(setup, timed, fn):
    """The most bytes torch's CPU allocator held at once during one call, beyond what it held
    before: torch keeps no peak for the CPU, so it is read off the profiler's record of each
    allocation and free, in order. The call is an extra one, untimed."""
    from torch.profiler import ProfilerActivity, profile

    state = setup(fn)
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                     profile_memory=True) as prof:
        out = timed(state)
        del out, state
    events = sorted((event.start_ns(), event.nbytes())
                    for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto writes a line to file descriptor 2 as each profile starts and stops."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def contradictions(rows):
    """Lines describing figures that contradict themselves, for the rows of one case."""
    found = []
    by_provider = {}
    for row in rows:
        by_provider.setdefault(row["provider"], {})[row["mode"]] = row
        spread = row["p80_ms"] / row["p20_ms"]
        if spread > MAX_SPREAD:
            found.append(f"{row['provider']} {row['mode']}: p80/p20 = {spread:.1f} > {MAX_SPREAD}")
    low, high = SUM_OF_PARTS_RANGE
    for provider, modes in by_provider.items():
        if all(mode in modes for mode in MODES):
            ratio = ((modes["forward"]["median_ms"] + modes["backward"]["median_ms"])
                     / modes["full"]["median_ms"])
            if not low <= ratio <= high:
                found.append(f"{provider}: (forward + backward) / full = {ratio:.2f}, "
                             f"outside [{low}, {high}]")
    return found
