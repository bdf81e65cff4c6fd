"""Random exploration of the suite's Hypothesis properties for a time budget (`make fuzz`).

    python tests/fuzz.py [--minutes 20] [pytest arguments, e.g. -k fused_loss]

`make test` and CI run fixed draws (conftest's "ci" profile), so a bug that only a
random draw finds would reach users first. This runs rounds of `pytest -m hypothesis`
under the "fuzz" profile, each round with fresh random draws and no example database,
until the budget is spent (the last round is let finish) or a round fails, and says
how many examples ran. A failing example is printed shrunk, with its reproduction blob;
a drawn case prints as its entry of FOUND_BY_FUZZ in tesloss/testing/regimes.py, which every
device then runs as a fixed case. Add it, and fix the kernel; nothing is kept in a local
database for the next run to replay.
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Hypothesis's statistics: "- 300 passing, 3 failing, and 4 invalid test cases".
CASES = re.compile(r"- (\d+) passing, (\d+) failing, and (\d+) invalid test cases")


def run_round(pytest_args):
    """One round: (pytest's exit status, examples run, its output)."""
    env = {**os.environ, "TESLOSS_HYPOTHESIS_PROFILE": "fuzz", "TESLOSS_REQUIRE_EXTENSION": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m",
               "hypothesis", "--hypothesis-show-statistics", *pytest_args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    examples = sum(int(passing) + int(failing) for passing, failing, _ in CASES.findall(output))
    return done.returncode, examples, output


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="time budget (default 20)")
    args, pytest_args = parser.parse_known_args()
    start = time.monotonic()
    rounds = examples = 0
    while time.monotonic() - start < args.minutes * 60:
        status, count, output = run_round(pytest_args or ["tests"])
        rounds += 1
        examples += count
        elapsed = (time.monotonic() - start) / 60
        print(f"round {rounds}: {count} examples, {examples} in all, {elapsed:.1f} min",
              flush=True)
        if status != 0:
            print(output)
            print(f"fuzz: a random draw failed in round {rounds}, after {examples} examples. "
                  "Make the example above a fixed test case, then fix the cause.")
            return 1
    print(f"fuzz: {examples} examples in {rounds} rounds, {elapsed:.1f} min, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
