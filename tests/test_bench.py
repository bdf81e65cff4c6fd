"""The benchmark script runs, checks correctness and writes the CSV other tools read."""
import csv
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_loss.py"

CSV_COLUMNS = ["timestamp", "device", "device_name", "torch_version", "tesloss_version",
               "provider", "mode", "dtype", "B", "C", "target", "median_ms", "p20_ms",
               "p80_ms", "gbps",
               "pct_of_peak", "peak_mem_mb", "max_rel_err"]


def test_quick_run_writes_checked_rows(tmp_path):
    out = tmp_path / "bench.csv"
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--device", "cpu", "--out",
                          str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (f"bench_loss.py exited {run.returncode}:\n"
                                 f"{run.stdout}\n{run.stderr}")

    with open(out, newline="") as results:
        reader = csv.reader(results)
        header = next(reader)
        rows = [dict(zip(header, row)) for row in reader]
    assert header == CSV_COLUMNS
    assert rows, f"no rows written; stdout:\n{run.stdout}"
    assert {row["provider"] for row in rows} >= {"tesloss", "eager"}
    assert {row["mode"] for row in rows} == {"forward", "backward", "full"}
    for row in rows:
        assert row["device"] == "cpu"
        assert math.isfinite(float(row["median_ms"])) and float(row["median_ms"]) > 0, row
        assert float(row["max_rel_err"]) < 1e-2, row
        assert row["peak_mem_mb"] == "", row  # not measured on the CPU

    # A second run appends without repeating the header.
    rerun = subprocess.run([sys.executable, str(BENCH), "--quick", "--device", "cpu",
                            "--modes", "full", "--providers", "tesloss", "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    lines = out.read_text().splitlines()
    assert lines.count(",".join(CSV_COLUMNS)) == 1
    assert len(lines) == 1 + len(rows) + 1


def _row(provider, mode, median, p20=None, p80=None):
    return dict(provider=provider, mode=mode, median_ms=median, p20_ms=p20 or median,
                p80_ms=p80 or median)


def test_figures_that_contradict_themselves_are_flagged():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import harness
    finally:
        sys.path.remove(str(BENCH.parent))
    consistent = [_row("a", "forward", 1.0), _row("a", "backward", 2.0), _row("a", "full", 3.1)]
    assert harness.contradictions(consistent) == []
    parts_too_slow = [_row("a", "forward", 1.0), _row("a", "backward", 2.0),
                      _row("a", "full", 1.5)]
    assert [line.split(":")[0] for line in harness.contradictions(parts_too_slow)] == ["a"]
    spread = [_row("b", "full", 1.0, p20=0.5, p80=2.0)]
    assert "p80/p20 = 4.0" in harness.contradictions(spread)[0]
