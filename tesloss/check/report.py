"""The check's readable report, from the dict that ``--json`` writes."""

_SPEED_NOTE = ("forward + backward of the mean loss with class-index targets, median of "
               "torch.utils.benchmark's runs; GB/s counts 6*B*C elements (both logits read "
               "twice, both gradients written); copy % is a copy of as many bytes timed in "
               "the same run over the provider's time. eager is tesloss.reference (the "
               "published recipe in plain PyTorch); torch.compile is that recipe compiled; "
               "first call is the first step's time, compiling included.")


def _environment(env):
    backend = env["backend"]
    lines = [
        f"tesloss {env['tesloss']}: {backend['build']} library"
        + (f" at {backend['library']}" if backend["library"] else "")
        + f"; kernels for {', '.join(backend['kernels_for']) or 'no device'}"
        + (f"; CPU kernels {backend['cpu_capability']}" if backend["cpu_capability"] else ""),
        f"torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'}), Python {env['python']}, "
        f"{env['platform']}",
        f"CUDA devices visible: {env['cuda_devices']}"
        + (f", driver {env['cuda_driver']}" if env["cuda_driver"] else ""),
    ]
    lines += [f"note: {note}" for note in backend["notes"]]
    if backend["load_error"]:
        lines.append(f"load error: {backend['load_error']}")
    return lines


def _device(name, facts):
    details = ", ".join(f"{key} {value}" for key, value in facts["device"].items()
                        if key != "name")
    return f"{name}: {facts['device']['name']} ({details})"


def _correctness(checks):
    failed = [c for c in checks if not c["passed"]]
    seconds = sum(c["seconds"] for c in checks)
    lines = [f"  correctness: {len(checks) - len(failed)} of {len(checks)} checks within the "
             f"rule ({seconds:.0f} s)"]
    for c in failed:
        dtype = f" [{c['dtype']}]" if c["dtype"] else ""
        error = c["error"].strip().replace("\n", "\n      ")
        lines.append(f"  FAILED {c['case']}{dtype}:\n      {error}")
    return lines


def _speed(rows):
    if not rows:
        return []
    lines = ["  speed:", f"    {'shape':<12} {'dtype':<9} {'provider':<14} {'median':>10} "
             f"{'GB/s':>8} {'copy %':>7} {'first call':>11}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"    {shape:<12} {r['dtype']:<9} {r['provider']:<14} "
                     f"{r['median_ms']:>7.3f} ms {r['gbps']:>8.1f} {r['copy_pct']:>7.1f} "
                     f"{r['first_call_s']:>9.2f} s")
    return lines


def render(results):
    verdict = "PASSED" if results["passed"] else "FAILED"
    lines = [f"tesloss check: {verdict} in {results['seconds']:.0f} s", ""]
    lines += _environment(results["environment"])
    has_speed = False
    for name, facts in results["devices"].items():
        lines += ["", _device(name, facts)]
        lines += _correctness(facts["correctness"])
        lines += _speed(facts["speed"])
        has_speed = has_speed or bool(facts["speed"])
    if has_speed:
        lines += ["", _SPEED_NOTE]
    return "\n".join(lines)
