"""``python -m tesloss.check``: whether tesloss is right, and how fast, on this machine.

For each device with kernels (the CPU, and each visible CUDA device) it reports
what is in use, holds the kernels to the accuracy rule of tesloss.testing over
a sweep of cases, runs on CUDA what only a GPU has (a graph replay, a second
stream, the device-side assert), and times forward + backward beside the recipe
in eager PyTorch and under torch.compile. It prints a report to paste into an
issue, writes the same as JSON with ``--json FILE``, and exits 1 if any check
fails.
"""
import argparse
import json
import time

from . import correctness, environment, report, speed


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m tesloss.check",
        description="Check tesloss's kernels against the float64 truth and time them, "
                    "on each device they are compiled for.")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--device", action="append", metavar="DEVICE",
                        help="a device to check (cpu, cuda:0, ...); may repeat. "
                             "Default: every device with kernels")
    parser.add_argument("--cases", metavar="TEXT",
                        help="run only the correctness cases whose name holds TEXT")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave torch.compile out of the benchmark (it compiles for minutes "
                             "on a small CPU)")
    return parser


def _devices(parser, asked):
    available = environment.devices_with_kernels()
    if not available:
        parser.error("no device has tesloss kernels: the compiled library did not load "
                     f"({environment.environment()['backend']['load_error']})")
    if not asked:
        return available
    for device in asked:
        if device not in available and not (device == "cuda" and "cuda:0" in available):
            parser.error(f"argument --device: expected one of {', '.join(available)}, "
                         f"got {device!r}")
    return ["cuda:0" if device == "cuda" else device for device in asked]


def check(devices, cases=None, bench=True, compile_recipe=True):
    """The report, as a dict: the environment, then per device its description,
    correctness results and benchmark rows; "passed" is False if any check failed."""
    start = time.perf_counter()
    results = {"environment": environment.environment(), "devices": {}}
    for device in devices:
        checks = correctness.run_sweep(device, cases)
        if device.startswith("cuda") and cases is None:
            checks += correctness.run_cuda_only(device)
        results["devices"][device] = {
            "device": environment.describe_device(device),
            "correctness": checks,
            "speed": speed.run_benchmark(device, compile_recipe) if bench else [],
        }
    results["passed"] = all(c["passed"] for d in results["devices"].values()
                            for c in d["correctness"])
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    devices = _devices(parser, args.device)
    results = check(devices, args.cases, not args.no_bench, not args.no_compile)
    if not any(d["correctness"] for d in results["devices"].values()):
        parser.error(f"argument --cases: no correctness case holds {args.cases!r}")
    print(report.render(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
            out.write("\n")
    return 0 if results["passed"] else 1


__all__ = ["check", "main"]
