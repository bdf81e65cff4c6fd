#!/usr/bin/env python
"""Fits the degree-6 polynomial that the vector exp2 (csrc/cpu/vec_exp.h) uses for 2^f on [-1/2, 1/2].

    python csrc/cpu/fit_exp2.py           # print the coefficients and their errors
    python csrc/cpu/fit_exp2.py --check   # exit 1 unless vec_exp.h holds exactly these

The constant coefficient is 1 exactly, so that p(0) = 1 and 2^n is exact for every integer n:
the kernels take exp(0) for each row's max class, and a sum of exponentials that holds an
exact 1 is >= 1, so its log is >= 0 (csrc/tes_loss.h).

Two steps, both deterministic:
1. Remez exchange for the minimax *relative* error of p(f) = 1 + f r(f) against 2^f (in
   float64), since the kernel scales p(f) by 2^n exactly, so p's relative error is the exp's.
   With the constant fixed, that is a weighted minimax fit of r to (2^f - 1) / f, with the
   weight f / 2^f.
2. The coefficients rounded to float32, then moved one float32 step at a time (up to four
   steps, one coefficient at a time, until no move helps) while that lowers the max relative
   error of p evaluated as the kernel evaluates it: Horner's rule in float32, one rounding per
   fused multiply-add. Rounding the float64 minimax coefficients alone loses more than the
   search wins back.

The errors are measured on GRID_POINTS evenly spaced float32 values of f.
"""
import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np

DEGREE = 6
GRID_POINTS = 400_001
MAX_STEPS = 4
HEADER = Path(__file__).resolve().parent / "vec_exp.h"


def grid():
    return np.linspace(-0.5, 0.5, GRID_POINTS).astype(np.float32)


def elementwise(function, x):
    """function (from math, the C library's) of each element of x, in float64. numpy's
    own exp, expm1 and cos take a CPU's vector kernels (AVX-512 ones where it has them),
    whose last bits differ from AVX2's: the fit they gave moved one coefficient by 60
    float32 steps from one machine to another (2026-12-05), failing --check."""
    return np.fromiter((function(v) for v in np.asarray(x, dtype=np.float64).tolist()),
                       dtype=np.float64, count=np.size(x))


def exp2(x):
    return elementwise(lambda v: 2.0 ** v, x)


def solve(matrix, rhs):
    """matrix^-1 rhs by Gaussian elimination with partial pivoting, in plain float64
    Python: np.linalg.solve goes through OpenBLAS, whose kernel is chosen for the CPU at
    run time, and its last bits moved the fitted coefficients by one float32 step from one
    machine to another (2026-12-02), failing --check."""
    rows = [[*map(float, row), float(b)] for row, b in zip(matrix.tolist(), rhs.tolist())]
    n = len(rows)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / rows[col][col]
            rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col])]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (rows[r][n] - sum(rows[r][k] * x[k] for k in range(r + 1, n))) / rows[r][r]
    return np.array(x)


def remez(f64, iterations=60):
    """Minimax coefficients (lowest degree first, the first 1) of the relative error of
    p(f) = 1 + f r(f) against 2^f."""
    def target(x):  # (2^x - 1) / x, and its limit log 2 at 0
        safe = np.where(x == 0, 1.0, x)
        return np.where(x == 0, math.log(2), elementwise(math.expm1, x * math.log(2)) / safe)

    def weight(x):
        return np.abs(x) / exp2(x)

    nodes = DEGREE + 1  # DEGREE coefficients of r and the level of the error
    points = 0.5 * elementwise(math.cos, np.pi * np.arange(nodes) / (nodes - 1))[::-1]
    target_f64, weight_f64 = target(f64), weight(f64)
    for _ in range(iterations):
        system = np.column_stack([points ** k for k in range(DEGREE)]
                                 + [(-1.0) ** np.arange(nodes) / weight(points)])
        r = solve(system, target(points))[:-1]
        error = (np.polyval(r[::-1], f64) - target_f64) * weight_f64
        # The new reference points: the largest |error| between sign changes, leaving out
        # f = 0, where the error is 0 by construction; then the largest at either end.
        bounds = [0, *(np.nonzero(np.diff(np.sign(error)))[0] + 1), len(f64)]
        extrema = [a + np.argmax(np.abs(error[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
        extrema = [e for e in extrema if f64[e] != 0]
        while len(extrema) > nodes:
            extrema = extrema[1:] if abs(error[extrema[0]]) < abs(error[extrema[-1]]) \
                else extrema[:-1]
        if len(extrema) != nodes:
            break
        points = f64[extrema]
    return np.concatenate([[1.0], r])


def horner_fp32(coefficients, f):
    """p(f) as the kernel computes it: float32 Horner, one rounding per fused multiply-add
    (a product of two float32 values is exact in float64)."""
    p = np.full_like(f, coefficients[-1])
    for c in coefficients[-2::-1]:
        p = (p.astype(np.float64) * f.astype(np.float64) + np.float64(c)).astype(np.float32)
    return p


def max_rel_error(coefficients, f, exact):
    """Of p evaluated as the kernel does at f, against exact = 2^f."""
    return float(np.abs(horner_fp32(coefficients, f).astype(np.float64) / exact - 1).max())


def fit():
    f = grid()
    exact = exp2(f)
    coefficients = remez(f.astype(np.float64)).astype(np.float32)
    best = max_rel_error(coefficients, f, exact)
    improved = True
    while improved:
        improved = False
        for k in range(1, DEGREE + 1):  # the constant stays 1
            for steps in [s for n in range(1, MAX_STEPS + 1) for s in (-n, n)]:
                trial = coefficients.copy()
                direction = np.float32(np.inf if steps > 0 else -np.inf)
                for _ in range(abs(steps)):
                    trial[k] = np.nextafter(trial[k], direction)
                error = max_rel_error(trial, f, exact)
                if error < best:
                    best, coefficients, improved = error, trial, True
    return coefficients, best


def header_coefficients():
    """The coefficients in vec_exp.h, lowest degree first (it lists them highest first)."""
    body = HEADER.read_text().split("kExp2Coefficients[] = {", 1)[1].split("};", 1)[0]
    values = [float(v) for v in re.findall(r"([-0-9.e]+)f", body)]
    return np.array(values[::-1], dtype=np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 unless {HEADER.name} holds exactly the fitted coefficients")
    args = parser.parse_args(argv)
    coefficients, error = fit()
    f = grid()
    exact64 = np.polyval(coefficients.astype(np.float64)[::-1], f.astype(np.float64))
    error64 = float(np.abs(exact64 / exp2(f) - 1).max())
    print(f"max relative error of p(f) against 2^f on [-1/2, 1/2]: {error:.3e} in float32 "
          f"Horner, {error64:.3e} with the polynomial evaluated exactly")
    print("highest degree first, as the kernels apply them:")
    for c in coefficients[::-1]:
        print(f"  {float(c)!r}f")
    if args.check:
        in_header = header_coefficients()
        if not np.array_equal(in_header, coefficients):
            print(f"{HEADER.name} holds {[float(c) for c in in_header[::-1]]}: not the fit")
            return 1
        print(f"{HEADER.name} holds these coefficients")
    return 0


if __name__ == "__main__":
    sys.exit(main())
