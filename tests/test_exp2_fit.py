"""The AVX-512 exp's polynomial (csrc/cpu/vec_exp.h) is the one csrc/cpu/fit_exp2.py fits."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "csrc" / "cpu" / "fit_exp2.py"


def test_the_header_holds_the_fitted_coefficients():
    run = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
