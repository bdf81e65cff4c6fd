"""`python -m tesloss.check`: a user's one command for whether tesloss is right,
and how fast, on their machine. It passes on a right build, refuses what it does
not understand, and fails, naming the case, when a kernel is wrong."""
import json
import subprocess
import sys

import pytest

from tesloss import _ops
from tesloss import check as tes_check
from tesloss.testing import ALL_DTYPES, EDGE_CLASSES, EDGE_TARGETS, REDUCTIONS, ROW_LAYOUTS
from tesloss.testing.sweep import sweep

pytestmark = pytest.mark.skipif(not _ops.has_kernel("cpu"),
                                reason=f"no compiled CPU kernels ({_ops.LOAD_ERROR})")


def test_the_whole_check_passes_on_this_machine_and_writes_its_json(tmp_path):
    report = tmp_path / "check.json"
    child = subprocess.run([sys.executable, "-m", "tesloss.check", "--json", str(report)],
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stdout + child.stderr
    assert child.stdout.startswith("tesloss check: PASSED")
    results = json.loads(report.read_text())
    assert results["passed"] and list(results["devices"]) == ["cpu"]
    cpu = results["devices"]["cpu"]
    assert len(cpu["correctness"]) > 200 and all(c["passed"] for c in cpu["correctness"])
    assert {r["provider"] for r in cpu["speed"]} == {"tesloss", "eager", "torch.compile"}
    assert all(r["median_ms"] > 0 for r in cpu["speed"])


@pytest.mark.parametrize("argv, words", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--device", "tpu"], "argument --device: expected one of cpu"),
    (["--cases", "no such case"], "argument --cases: no correctness case holds 'no such case'"),
])
def test_it_refuses_what_it_does_not_understand(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        tes_check.main(argv + ["--no-bench"])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def test_a_wrong_kernel_fails_the_check_and_is_named(monkeypatch, tmp_path, capsys):
    """A fault injected into the forward op: the loss 0.1% high on rows of 1001
    classes. The check exits 1, and its report and JSON name those cases alone."""
    right = _ops.FORWARD

    def wrong(vis_logits, *args):
        loss, row_stats, batch_stats = right(vis_logits, *args)
        return (loss * 1.001 if vis_logits.shape[1] == 1001 else loss), row_stats, batch_stats

    monkeypatch.setattr(_ops, "FORWARD", wrong)
    report = tmp_path / "check.json"
    assert tes_check.main(["--cases", "C=100", "--no-bench", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("tesloss check: FAILED")
    checks = json.loads(report.read_text())["devices"]["cpu"]["correctness"]
    failed = [c["case"] for c in checks if not c["passed"]]
    assert failed and all("C=1001 " in case for case in failed)
    assert any(c["passed"] for c in checks)  # C=100 and C=1000 are right
    for case in failed:
        assert f"FAILED {case}" in out
    assert "loss" in out


def test_the_sweep_reaches_every_dtype_target_reduction_layout_and_class_count():
    cases = list(sweep())
    names = " | ".join(case.name for case in cases)
    assert {case.dtype for case in cases} == set(ALL_DTYPES)
    for word in [f"C={c} " for c in EDGE_CLASSES] + [f"{t} target" for t in EDGE_TARGETS] + \
            [f"{layout} rows" for layout in ROW_LAYOUTS] + [f"reduction {r}" for r in REDUCTIONS]:
        assert word in names, word
    assert len({case.name + str(case.dtype) for case in cases}) == len(cases)
