"""The benchmark script runs, checks correctness and writes the CSV other tools read."""
import csv
import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_loss.py"

CSV_COLUMNS = ["timestamp", "device", "device_name", "torch_version", "tesloss_version",
               "provider", "mode", "dtype", "B", "C", "target", "median_ms", "p20_ms",
               "p80_ms", "gbps",
               "pct_of_peak", "peak_mem_mb", "max_rel_err", "min_ms"]
SHAPE = (256, 1000)  # what --quick runs


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
    gradient_mb = 4 * SHAPE[0] * SHAPE[1] / 2**20  # one fp32 gradient
    for row in rows:
        assert row["device"] == "cpu"
        assert 0 < float(row["min_ms"]) <= float(row["median_ms"]) < math.inf, row
        assert float(row["max_rel_err"]) < 1e-2, row
        assert float(row["peak_mem_mb"]) >= 0, row
        if row["mode"] == "full":  # both gradients are allocated within the step
            assert 2 * gradient_mb <= float(row["peak_mem_mb"]) < 20 * gradient_mb, row
    for name in ("tesloss", "eager"):
        assert f"provider {name}: " in run.stdout
    assert "bytes model: " in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("load: ")

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


def _bench_module(name):
    sys.path.insert(0, str(BENCH.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH.parent))


def test_figures_that_contradict_themselves_are_flagged():
    harness = _bench_module("harness")
    consistent = [_row("a", "forward", 1.0), _row("a", "backward", 2.0), _row("a", "full", 3.1)]
    assert harness.contradictions(consistent) == []
    parts_too_slow = [_row("a", "forward", 1.0), _row("a", "backward", 2.0),
                      _row("a", "full", 1.5)]
    assert [line.split(":")[0] for line in harness.contradictions(parts_too_slow)] == ["a"]
    spread = [_row("b", "full", 1.0, p20=0.5, p80=2.0)]
    assert "p80/p20 = 4.0" in harness.contradictions(spread)[0]


def test_the_load_verdict_says_loaded_when_medians_drift_or_others_take_cpus():
    report = _bench_module("report")
    steady = [dict(median_ms=1.05, min_ms=1.0)] * 3
    drifting = [dict(median_ms=1.6, min_ms=1.0)] * 3
    assert report.load_verdict(steady, (0.0, 0.0), 2).startswith("load: quiet, medians 5% ")
    assert report.load_verdict(drifting, (0.0, 0.0), 2).startswith("load: LOADED, medians 60%")
    busy = report.load_verdict(steady, (1.2, 0.1), 2)
    assert busy.startswith("load: LOADED") and "other work took 1.20 of 2 CPUs" in busy
    assert report.load_verdict(steady, None, 2).startswith("load: quiet")


def test_an_older_csv_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    report = _bench_module("report")
    old = tmp_path / "old.csv"
    old.write_text(",".join(report.CSV_COLUMNS[:-1]) + "\n" + ",".join(["x"] * 18) + "\n")
    report.check_csv(old)
    lines = old.read_text().splitlines()
    assert lines == [",".join(report.CSV_COLUMNS), ",".join(["x"] * 18) + ","]
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="choose another --out"):
        report.check_csv(other)
