#!/usr/bin/env python
"""Benchmark of the TeS loss: providers x shapes x dtypes x modes, checked, timed, written to CSV.

Providers (bench/providers.py; the report names each): tesloss, the fused op; two_pass, its
raw forward and backward ops, the kernels before the single pass; eager, the published
recipe in plain PyTorch (tesloss.reference.tes_loss); torch_compile, that recipe compiled;
liger, on CUDA, Liger-Kernel's losses composed into the TeS loss. A provider that cannot run
here is skipped with a printed note.

Modes: forward (the loss call), backward (loss.backward(), the forward untimed), full (both).

Targets (--targets): index (class indices, the published recipe, the default), smoothed (the
same with label_smoothing 0.1) and mixup (fp32 [B, C] class probabilities, each row a mix of
two labels smoothed by 0.1, as timm's Mixup makes them). Liger takes class indices only.

Every provider's loss and gradients are first compared with the reference in float64 (the
correctness gate); one that fails is not timed, and the script exits 1. Then the providers
take turns; the report gives medians, minima and p20/p80 of single calls, peak memory, ratios
against the peers measured in the same run and bandwidth from the bytes model below; it
flags figures that contradict themselves, and ends with a verdict on how loaded the machine
was. bench/harness.py does the measuring, bench/report.py the writing; docs/DESIGN.md says
why it measures as it does.

Bytes model, the least traffic any implementation needs, with E the logits' element size:
forward reads both logits (2*B*C*E), backward reads both and writes both gradients (4*B*C*E),
full reads both and writes both gradients once (4*B*C*E, the single pass; two passes move
6*B*C*E); a probability target adds one read of its B*C*T bytes to each (T its element
size); class indices and O(B) statistics are left out.

Results are appended to bench/out/bench_<device>.csv (not tracked). With --record they go to
bench/results/bench_<device>.csv instead, with the printed report in
bench/results/bench_<device>.txt, to be committed.

Examples
  python bench/bench_loss.py                        # the default set for the device
  python bench/bench_loss.py --quick --device cpu   # a smoke run of a few seconds
  python bench/bench_loss.py --shapes 256x1000 --dtypes fp32,bf16 --modes full --markdown
  python bench/bench_loss.py --record --markdown    # figures for the README
"""
import argparse
import datetime
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import harness
import providers as prov
import report
import tesloss
from tesloss import reference

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
CPU_SHAPES = [(256, 100), (256, 1000), (1024, 1000), (256, 21843)]  # CIFAR-100, IN-1k, IN-21k
# The shapes GPU results are judged on first (B*C >= 2^26 for the last two), then the rest.
CUDA_SHAPES = [(256, 1000), (4096, 16384), (8192, 32768), (256, 100), (1024, 1000),
               (256, 21843)]
QUICK_SHAPES = [(256, 1000)]
ELEMENT_PASSES = {"forward": 2, "backward": 4, "full": 4}  # [B, C] passes of the bytes model
TARGET_PASSES = {"forward": 1, "backward": 1, "full": 1}  # of a probability target
TARGET_FORMS = ("index", "smoothed", "mixup")
MIXUP_LAMBDA = 0.7

IGNORED_FRACTION = 0.05
VIS_STD = 2.0
EMBED_DIM = 64
# Weight of the label's class embedding in an image embedding: makes the text logits peak at
# the label, as a zero-shot text classifier's do, instead of being pure noise.
LABEL_PULL = 0.5

# The correctness gate. For fp32 and fp64 it sits far above rounding, so only a wrong result
# trips it. bf16 and fp16 follow the tests' rule: at most twice the error of the recipe
# computed in that dtype (whose own error can exceed 1e-2), and never below 1e-2.
MAX_REL_ERR_GATE = 1e-3
HALF_GATE_FACTOR, HALF_GATE_FLOOR = 2.0, 1e-2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for what is measured.")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", type=_choices(prov.NAMES),
                        help=f"comma-separated subset of {','.join(prov.NAMES)} (default: all "
                             "that run on the device; --quick leaves out torch_compile)")
    parser.add_argument("--modes", type=_choices(harness.MODES),
                        help="default: forward,backward,full")
    parser.add_argument("--dtypes", type=_choices(DTYPES),
                        help="default: fp32,bf16 (and fp16 on CUDA); --quick: fp32")
    parser.add_argument("--shapes", type=_shapes, help="BxC,... e.g. 256x1000,256x21843")
    parser.add_argument("--targets", type=_choices(TARGET_FORMS), default=("index",),
                        help=f"comma-separated subset of {','.join(TARGET_FORMS)} (default: "
                             "index)")
    parser.add_argument("--reps", type=int,
                        help="timed calls per provider (default: adaptive, about "
                             f"{harness.REP_BUDGET_S['cpu']} s per cell on CPU, "
                             f"{harness.REP_BUDGET_S['cuda']} s on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed calls per provider first "
                                                   "(default: 5 on CPU, 10 on CUDA; --quick: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in seconds: one shape (256x1000), fp32, 5 reps, "
                             "no torch_compile unless named in --providers")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path,
                       help="CSV to append to (default: bench/out/bench_<device>.csv)")
    where.add_argument("--record", action="store_true",
                       help="append to the tracked bench/results/bench_<device>.csv and write "
                            "the report to bench/results/bench_<device>.txt")
    parser.add_argument("--markdown", action="store_true",
                        help="also print a Markdown table of the full-mode results")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="CPU: keep glibc malloc's adaptive mmap/trim thresholds instead of "
                             "fixing them (see docs/DESIGN.md)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch reports no CUDA device")
    for name in ("threads", "reps", "warmup"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    on_cuda = args.device == "cuda"
    if args.providers is None:
        args.providers = [p for p in prov.NAMES
                          if not (args.quick and p == "torch_compile")
                          and not (p == "liger" and not on_cuda)]
        if args.quick:
            print("note: --quick leaves out torch_compile (name it in --providers to include it)")
    args.modes = args.modes or list(harness.MODES)
    if args.dtypes is None:
        args.dtypes = ["fp32"] if args.quick else ["fp32", "bf16"] + (["fp16"] if on_cuda else [])
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else (CUDA_SHAPES if on_cuda else CPU_SHAPES)
    if args.warmup is None:
        args.warmup = 2 if args.quick else (10 if on_cuda else 5)
    if args.reps is None and args.quick:
        args.reps = 5
    folder = HERE / ("results" if args.record else "out")
    args.report = folder / f"bench_{args.device}.txt" if args.record else None
    args.out = args.out or folder / f"bench_{args.device}.csv"
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


def make_inputs(batch, num_classes, dtype, device, seed, target_form="index"):
    """vis_logits ~ N(0, VIS_STD^2); txt_logits are cosine similarities between normalized
    random image embeddings, pulled towards their label's class embedding, and normalized
    random class embeddings; IGNORED_FRACTION of the rows ignored (class indices), or, for
    mixup, fp32 rows MIXUP_LAMBDA * onehot(y) + (1 - MIXUP_LAMBDA) * onehot(y of the
    reversed batch), smoothed by providers.SMOOTHING (timm's mixup_target)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(num_classes, (batch,), generator=gen, device=device)
    ignored = torch.rand(batch, generator=gen, device=device) < IGNORED_FRACTION
    ignored[0] = False  # at least one row counts, so "mean" is a number
    target = torch.where(ignored, prov.IGNORE_INDEX, labels)
    if target_form == "mixup":
        off, on = prov.SMOOTHING / num_classes, 1 - prov.SMOOTHING + prov.SMOOTHING / num_classes
        onehot = F.one_hot(labels, num_classes).float() * (on - off) + off
        target = MIXUP_LAMBDA * onehot + (1 - MIXUP_LAMBDA) * onehot.flip(0)

    vis_logits = VIS_STD * torch.randn(batch, num_classes, generator=gen, device=device)
    class_embed = F.normalize(torch.randn(num_classes, EMBED_DIM, generator=gen, device=device),
                              dim=1)
    image_embed = torch.randn(batch, EMBED_DIM, generator=gen, device=device) / EMBED_DIM ** 0.5
    image_embed = image_embed + LABEL_PULL * class_embed[labels]
    txt_logits = F.normalize(image_embed, dim=1) @ class_embed.T
    return vis_logits.to(dtype), txt_logits.to(dtype), target


# ---------------------------------------------------------------------------------------------
# One shape and dtype


def run_case(batch, num_classes, dtype_name, target_form, providers, args, timer, copy_gbps):
    """The case's result rows, whether a provider failed its gate, and any contradictions."""
    device, dtype = args.device, DTYPES[dtype_name]
    shape = f"{batch}x{num_classes}"
    inputs = make_inputs(batch, num_classes, dtype, device, args.seed, target_form)
    recipe = prov.with_target_form(reference.tes_loss, target_form)
    # The target's probabilities stay fp32, as Mixup makes them: only the logits go to fp64.
    expected = harness.evaluate(recipe, *(x.double() if i < 2 else x
                                          for i, x in enumerate(inputs)))
    element_bytes = inputs[0].element_size()
    working_set = 4 * batch * num_classes * element_bytes  # inputs and gradients
    flush = device == "cuda" and working_set <= 2 * timer.l2_bytes
    print(f"\n== {shape} {dtype_name} {target_form} targets" + (
        f": L2 flush before each call: {'yes' if flush else 'no'} (inputs+grads "
        f"{working_set / 1e6:.1f} MB, L2 {timer.l2_bytes / 1e6:.0f} MB)" if device == "cuda"
        else ""))

    limit = MAX_REL_ERR_GATE
    if dtype in (torch.bfloat16, torch.float16):
        recipe_err = harness.max_rel_err(harness.evaluate(recipe, *inputs), expected)
        limit = max(HALF_GATE_FLOOR, HALF_GATE_FACTOR * recipe_err)
        print(f"   correctness gate: max_rel_err <= {limit:.2e} (the recipe computed in "
              f"{dtype_name} is off by {recipe_err:.2e})")

    fns, errors, failed = {}, {}, False
    for name, fn in providers.items():
        if name == "liger" and target_form != "index":
            print(f"   note: liger skipped for {target_form} targets: this composition of "
                  f"Liger's losses takes class indices only")
            continue
        if name in prov.PER_CASE:
            begin = time.perf_counter()
            try:
                fn = prov.SETUPS[name](device)
                harness.evaluate(fn, *inputs)  # compiles forward and backward
            except Exception as error:
                print(f"   note: {name} skipped for {shape} {dtype_name}: "
                      f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                continue
            print(f"   {name}: set up in {time.perf_counter() - begin:.1f} s")
        fn = prov.with_target_form(fn, target_form)
        err = harness.gate(name, fn, inputs, expected, limit)
        if err is None:
            failed = True
        else:
            fns[name], errors[name] = fn, err
    del expected

    leaves = (inputs[0].detach().requires_grad_(), inputs[1].detach().requires_grad_(), inputs[2])
    rows = []
    print(f"   {'mode':<9}{'provider':<15}{'median ms':>11}{'min':>9}{'p20':>9}{'p80':>9}"
          f"{'GB/s':>9}{'% copy':>8}{'peak MB':>9}{'max_rel_err':>13}")
    for mode in args.modes if fns else ():
        times, peaks = harness.time_mode(mode, fns, leaves, timer, args.warmup, args.reps, flush)
        nbytes = ELEMENT_PASSES[mode] * batch * num_classes * element_bytes
        if inputs[2].is_floating_point():
            nbytes += TARGET_PASSES[mode] * inputs[2].numel() * inputs[2].element_size()
        for name in fns:
            mid = harness.median(times[name])
            row = dict(provider=name, mode=mode, dtype=dtype_name, B=batch, C=num_classes,
                       target=target_form,
                       median_ms=mid, min_ms=min(times[name]),
                       p20_ms=harness.quantile(times[name], 0.2),
                       p80_ms=harness.quantile(times[name], 0.8),
                       gbps=nbytes / (mid * 1e-3) / 1e9, peak_mem_mb=peaks[name],
                       max_rel_err=errors[name])
            row["pct_of_peak"] = 100 * row["gbps"] / copy_gbps
            rows.append(row)
            peak = "" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.3g}"
            print(f"   {mode:<9}{name:<15}{mid:>11.4g}{row['min_ms']:>9.4g}{row['p20_ms']:>9.4g}"
                  f"{row['p80_ms']:>9.4g}{row['gbps']:>9.3g}{row['pct_of_peak']:>8.1f}"
                  f"{peak:>9}{row['max_rel_err']:>13.2e}")
        print(f"   {'':<9}{speedup_line(times)}  ({len(times[next(iter(fns))])} reps)")
    contradictions = [f"{shape} {dtype_name} {line}" for line in harness.contradictions(rows)]
    for line in contradictions:
        print(f"   INCONSISTENT: {line}")
    return rows, failed, contradictions


def speedup_line(times):
    if "tesloss" not in times:
        return "(tesloss not timed: no ratios)"
    mine = harness.median(times["tesloss"])
    others = [f"{harness.median(t) / mine:.2f}x vs {name}"
              for name, t in times.items() if name != "tesloss"]
    return "tesloss " + (", ".join(others) if others else "alone")


def main(argv=None):
    args = parse_args(argv)
    report.check_csv(args.out)
    with report.report_to(args.report):
        return run(args)


def run(args):
    device = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device == "cpu":
        allocator = ("allocator: glibc's adaptive defaults (--glibc-defaults)"
                     if args.glibc_defaults else harness.keep_freed_memory_mapped())
    load = harness.MachineLoad()
    timer = harness.Timer(device)
    n_threads = torch.get_num_threads()
    threads = (f"{n_threads} thread{'s' if n_threads > 1 else ''}" if device == "cpu"
               else f"CUDA {torch.version.cuda}")
    machine = dict(timestamp=datetime.datetime.now(datetime.timezone.utc)
                   .isoformat(timespec="seconds"),
                   device=device, device_name=harness.device_name(device),
                   torch_version=torch.__version__, tesloss_version=tesloss.__version__,
                   threads=threads)
    copy_gbps = harness.copy_bandwidth_gbps(device, timer)

    print(f"tesloss {tesloss.__version__} benchmark on {device} ({machine['device_name']}, "
          f"{threads}), torch {torch.__version__}, {machine['timestamp']}")
    for name in args.providers:
        print(f"provider {name}: {prov.DESCRIPTIONS[name]}")
    print("bytes model: forward reads vis and txt (2*B*C elements), backward reads both and "
          "writes both gradients (4*B*C), full = 4*B*C (the single pass: each read and "
          "written once); a probability target adds a read of its B*C elements to each; "
          "GB/s = bytes / median time")
    print(f"% copy: against torch copy_ of {harness.COPY_BYTES[device] >> 20} MiB "
          f"({'device to device' if device == 'cuda' else 'memory to memory'}, read + write "
          f"bytes) measured now: {copy_gbps:.1f} GB/s")
    if device == "cuda":
        print("timing: CUDA events from an idle GPU, launch overhead included; median, min and "
              "p20/p80 over interleaved calls")
    else:
        print(f"timing: perf_counter per call, no cache flush (shapes that fit in the CPU caches "
              f"run from them, so % copy can pass 100); providers take turns of "
              f"{harness.RUN_LENGTH['cpu']} calls; median, min and p20/p80 of single calls")
        print(allocator)
    print("modes: both logits require grad, so tesloss's forward is its single pass (the "
          "gradients written) and its backward hands them over; full, the step, compares alike")
    print("max_rel_err: max over loss, grad_vis, grad_txt of max|x - x64| / max|x64| against "
          "the float64 reference on the same inputs")
    print("peak MB: the most memory allocated at once during one more call beyond what was "
          "allocated before it, gradients included (" + (
              "torch.cuda.max_memory_allocated)" if device == "cuda" else
              "torch.profiler's record of the CPU allocator's allocations and frees)"))

    providers = {}
    for name in args.providers:
        try:
            providers[name] = None if name in prov.PER_CASE else prov.SETUPS[name](device)
        except prov.Unavailable as why:
            print(f"note: {name} skipped: {why}")

    rows, failed, contradictions = [], False, []
    for batch, num_classes in args.shapes:
        for dtype_name, target_form in itertools.product(args.dtypes, args.targets):
            case_rows, case_failed, case_contradictions = run_case(
                batch, num_classes, dtype_name, target_form, providers, args, timer, copy_gbps)
            # Each case's rows are written as soon as they exist, so a run cut short by a
            # time limit keeps what it measured.
            report.append_csv(args.out, case_rows, machine)
            rows += case_rows
            failed |= case_failed
            contradictions += case_contradictions
            if device == "cuda":
                torch.cuda.empty_cache()  # the next shape should not inherit this one's blocks

    print(f"\n{len(rows)} rows appended to {args.out}")
    verdict = report.load_verdict(rows, load.cpus_used(), os.cpu_count())
    if args.markdown:
        print()
        print(report.markdown_table(rows, machine, copy_gbps, prov.NAMES, prov.LABELS, "tesloss"))
    if contradictions:
        print(f"\n{len(contradictions)} figures contradict themselves (INCONSISTENT above): "
              "their medians are in doubt; the min column is the steadier figure")
    print(f"\n{verdict}")
    if failed:
        print("some providers failed their correctness check (FAIL above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
