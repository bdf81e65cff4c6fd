"""What a benchmark run leaves: the CSV rows, the Markdown table for the README, the verdict
on how loaded the machine was, and a copy of the printed report."""
import contextlib
import csv
import sys

from harness import RUN_LENGTH

CSV_COLUMNS = ["timestamp", "device", "device_name", "torch_version", "tesloss_version",
               "provider", "mode", "dtype", "B", "C", "target", "median_ms", "p20_ms", "p80_ms",
               "gbps", "pct_of_peak", "peak_mem_mb", "max_rel_err", "min_ms"]

# The verdict on a run's load. Medians this far above the minima (the median over the
# run's cells), or other work taking this many CPUs, make the medians a measure of the load
# as much as of the code. Single CPU calls on a quiet 2-core VM have medians 5-10% above
# their minima.
QUIET_SPREAD, LOADED_SPREAD = 1.10, 1.25
LOADED_CPUS = 0.5


def load_verdict(rows, cpus_used, num_cpus):
    """One line: how loaded the machine was while `rows` were measured, and which column
    to quote. `cpus_used` is harness.MachineLoad.cpus_used()."""
    ratios = sorted(row["median_ms"] / row["min_ms"] for row in rows if row["min_ms"] > 0)
    spread = ratios[len(ratios) // 2] if ratios else 1.0
    others = ""
    busy_cpus = 0.0
    if cpus_used is not None:
        busy_cpus = cpus_used[0] + cpus_used[1]
        others = (f"; other work took {cpus_used[0]:.2f} of {num_cpus} CPUs and the "
                  f"hypervisor stole {cpus_used[1]:.2f}")
    figures = f"medians {100 * (spread - 1):.0f}% above the minima (median over cells){others}"
    if spread >= LOADED_SPREAD or busy_cpus >= LOADED_CPUS:
        return (f"load: LOADED, {figures}: quote the min column, and rerun on a quieter "
                f"machine for medians")
    if spread >= QUIET_SPREAD:
        return f"load: some, {figures}: medians and minima both usable"
    return f"load: quiet, {figures}"


def check_csv(path):
    """Refuses, before any timing, a file that appending would corrupt. A file written
    before the newest columns were added gets them, empty in its old rows."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, newline="") as existing:
        rows = list(csv.reader(existing))
    header = rows[0] if rows else None
    if header == CSV_COLUMNS:
        return
    if header and header == CSV_COLUMNS[:len(header)]:
        missing = len(CSV_COLUMNS) - len(header)
        with open(path, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(row + [""] * missing for row in rows[1:])
        return
    sys.exit(f"bench: {path} has columns {header}, expected {CSV_COLUMNS}; "
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
                row["mode"], row["dtype"], row["B"], row["C"], row["target"],
                f"{row['median_ms']:.6g}",
                f"{row['p20_ms']:.6g}", f"{row['p80_ms']:.6g}", f"{row['gbps']:.4g}",
                f"{row['pct_of_peak']:.2f}",
                "" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.1f}",
                f"{row['max_rel_err']:.3e}", f"{row['min_ms']:.6g}",
            ])


def markdown_table(rows, machine, copy_gbps, providers, labels, subject):
    """Full-mode results, one line per (shape, dtype, target), `subject`'s ratio over each
    peer. The target column is shown where the rows hold more than class indices."""
    full = [row for row in rows if row["mode"] == "full"]
    if not full:
        return "(no full-mode results for the Markdown table)"
    present = [name for name in providers if any(row["provider"] == name for row in full)]
    peers = [name for name in present if name != subject]
    mine_present = subject in present
    show_target = any(row["target"] != "index" for row in full)
    header = (["shape (B×C)", "dtype"] + (["target"] if show_target else [])
              + [f"{labels[name]} ms" for name in present]
              + ([f"vs {labels[name]}" for name in peers] if mine_present else [])
              + ([f"{labels[subject]} GB/s (% of copy)"] if mine_present else []))
    turns = ("one call per turn" if RUN_LENGTH[machine["device"]] == 1
             else f"turns of {RUN_LENGTH[machine['device']]} calls")
    lines = [f"Forward + backward, median of single calls, providers taking {turns}; "
             f"{machine['device_name']}, {machine['threads']}, torch {machine['torch_version']}, "
             f"copy bandwidth {copy_gbps:.1f} GB/s.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    case_of = lambda row: (row["B"], row["C"], row["dtype"], row["target"])  # noqa: E731
    for case in dict.fromkeys(case_of(row) for row in full):
        batch, num_classes, dtype_name, target = case
        by_provider = {row["provider"]: row for row in full if case_of(row) == case}
        cells = [f"{batch}×{num_classes}", dtype_name] + ([target] if show_target else [])
        cells += [f"{by_provider[name]['median_ms']:.3g}" if name in by_provider else "–"
                  for name in present]
        mine = by_provider.get(subject)
        if mine_present:
            cells += [f"{by_provider[name]['median_ms'] / mine['median_ms']:.1f}×"
                      if mine and name in by_provider else "–" for name in peers]
            cells.append(f"{mine['gbps']:.3g} ({mine['pct_of_peak']:.0f}%)" if mine else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def report_to(path):
    """Everything printed inside also goes to `path` (when it is not None)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)):
        yield
