#!/usr/bin/env bash
# The GPU check, one script for a fresh machine with an NVIDIA GPU (written for
# an H200: torch 2.11, Python 3.12, nvcc 13.0, ninja, pytest, hypothesis; no
# network). In order, each step with its own time limit and log:
#   env        GPU, driver, torch, nvcc, compute-sanitizer
#   wheels     .whl/*.whl (e.g. liger-kernel), if carried, into /tmp/site
#   build      pip install --no-build-isolation --no-deps -e .  (TORCH_CUDA_ARCH_LIST=9.0)
#   check      python -m tesloss.check --device cuda: the correctness sweep under the
#              accuracy rule, a graph replay, a second stream, the device-side assert,
#              and a short benchmark; its report is check.txt and check.json
#   cuda_tests pytest -m cuda: every property on the GPU, and the GPU-only tests
#              (tests/test_cuda.py), with Hypothesis's short "gpu" profile
#   bench      bench/bench_loss.py --device cuda --modes full on the cells the GPU is
#              judged on (256x1000, 4096x16384, 8192x32768; fp32 and bf16), first, since
#              torch.compile compiles each shape and dtype afresh on a new machine
#   memcheck   compute-sanitizer memcheck on a few small forward+backward cases
#   racecheck  compute-sanitizer racecheck on the same cases
#   bench_fp16 the same shapes in fp16
#   bench_rest the other shapes (256x100, 1024x1000, 256x21843) in fp32, bf16 and fp16
#   cpu_tests  the rest of the test suite, with whatever time is left
# The bench steps append to one CSV; BENCH_ARGS, if set, replaces all three with one run.
# A failed step does not stop the later ones. The whole run stays within
# $GPU_CHECK_BUDGET_S seconds (default 465, under 8 minutes).
#
#   bench/gpu_check.sh [RESULTS_DIR]    default: $OUT if set, else bench/results/gpu-<date>
#
# Results: summary.txt, check.json, check.txt, test_cuda.xml, test_cuda.log, bench_cuda.csv
# and logs.tar.gz
# (every step's log). Where RESULTS_DIR is $OUT, the device tool's return folder,
# the loose logs are removed once packed, as only a few files come back from it.
# Exit status: 0 if every step passed, 1 otherwise.
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}}
LOGS="$RESULTS/logs"
mkdir -p "$LOGS"
BUDGET=${GPU_CHECK_BUDGET_S:-465}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY=()
FAILED=0
LAST_RC=0

# step NAME MAX_SECONDS COMMAND...: runs COMMAND into $LOGS/NAME.log under the
# smaller of MAX_SECONDS and the time left; records how it ended.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 20)); then
    SUMMARY+=("$(printf '%-11s %-24s' "$name" "skipped: no time left")")
    LAST_RC=125
    FAILED=1
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name (up to ${limit}s)"
  local start=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  local took=$((SECONDS - start)) state
  case $rc in
    0) state="ok" ;;
    124 | 137) state="TIMED OUT at ${limit}s" ;;
    *) state="FAILED (exit $rc)" ;;
  esac
  ((rc == 0)) || FAILED=1
  LAST_RC=$rc
  SUMMARY+=("$(printf '%-11s %-24s %4ss  %s' "$name" "$state" "$took" "logs/$name.log")")
  echo "   $state after ${took}s"
  tail -n 4 "$LOGS/$name.log" | sed 's/^/   | /'
  return 0
}

# In the bash -c scripts below, $0 is the Python to use.
step env 30 bash -c '
  nvidia-smi || true
  "$0" -c "import sys, torch
print(sys.version)
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")"
  nvcc --version || true
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer || true
  git log -1 --oneline 2>/dev/null || true' "$PY"

if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  ((LAST_RC == 0)) && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# setup.py finds the toolkit behind a wrapper nvcc and the cuSPARSE/cuBLAS headers
# that torch's wheels bring, so the build needs no extra flags here. pyproject.toml's
# license field needs setuptools >= 77; with an older one (or none), the first-use
# build compiles the same sources from the tree instead (python -m tesloss.build).
step build 240 env TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 MAX_JOBS="$(nproc)" bash -c '
  if "$0" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split(\".\")[0]) < 77)"; then
    "$0" -m pip install --no-build-isolation --no-deps -v -e .
  else
    echo "setuptools < 77 here: compiling on first use instead"; "$0" -m tesloss.build
  fi &&
  "$0" -c "import json, tesloss
info = tesloss.backend_info()
print(json.dumps(info))
assert info[\"cuda_compiled\"], \"tesloss was built without its CUDA kernels\""' "$PY"

# The user's check first: what a GPU user runs, and what the rest then explains.
# The CPU's own check is the cpu_tests step's business.
step check 150 "$PY" -m tesloss.check --device cuda --json "$RESULTS/check.json"
cp "$LOGS/check.log" "$RESULTS/check.txt" 2>/dev/null || true

timeout_plugin=()
"$PY" -c "import pytest_timeout" 2>/dev/null && timeout_plugin=(--timeout 150)
step cuda_tests 150 env TESLOSS_REQUIRE_EXTENSION=1 TESLOSS_HYPOTHESIS_PROFILE=gpu \
  "$PY" -m pytest -q -rfEs -p no:cacheprovider "${timeout_plugin[@]}" \
  --junitxml "$RESULTS/test_cuda.xml" -m cuda tests
cp "$LOGS/cuda_tests.log" "$RESULTS/test_cuda.log" 2>/dev/null || true

# Full mode (forward + backward), which the GPU results are judged on. The bench
# writes each shape's rows as it goes, so a cut-short step keeps what it finished.
JUDGED_SHAPES=256x1000,4096x16384,8192x32768
bench() {  # bench STEP_NAME MAX_SECONDS BENCH_LOSS_ARGS...
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$PY" bench/bench_loss.py --device cuda --out "$RESULTS/bench_cuda.csv" \
    --markdown --modes full "$@"
}
if [[ -n "${BENCH_ARGS:-}" ]]; then
  read -r -a bench_args <<<"$BENCH_ARGS"
  bench bench 170 "${bench_args[@]}"
else
  bench bench 170 --shapes "$JUDGED_SHAPES" --dtypes fp32,bf16
fi

cat >"$LOGS/sanitize_case.py" <<'EOF'
"""Forward and backward of the fused op on small cases that reach every launch
shape, misaligned and row-strided rows, ignored rows, an empty batch, and each
kind of target: class indices, smoothed ones, and probability rows (misaligned
too)."""
import torch

import tesloss

assert tesloss.backend_info()["cuda_compiled"], "tesloss has no CUDA kernels"
CASES = [  # (B, C), dtype, reduction, vis column offset, txt column offset, target
    ((3, 7), torch.float32, "mean", 0, 0, "index"),
    ((5, 1001), torch.bfloat16, "none", 1, 3, "index"),
    ((9, 1000), torch.float32, "sum", 0, 0, "index"),
    ((40, 100), torch.float16, "mean", 2, 2, "index"),
    ((2, 9000), torch.float64, "mean", 0, 1, "index"),
    ((3, 20000), torch.bfloat16, "mean", 0, 0, "index"),
    ((0, 5), torch.float32, "mean", 0, 0, "index"),
    ((5, 1001), torch.bfloat16, "mean", 1, 1, "smoothed"),
    ((3, 20000), torch.float32, "none", 0, 0, "smoothed"),
    ((5, 1001), torch.bfloat16, "mean", 0, 0, "probs"),
    ((9, 1000), torch.float32, "sum", 1, 1, "probs"),
    ((2, 9000), torch.float64, "mean", 0, 0, "probs"),
    ((3, 20000), torch.bfloat16, "none", 2, 2, "probs"),
]
for (batch, num_classes), dtype, reduction, vis_offset, txt_offset, kind in CASES:
    width = num_classes + 4

    def rows(offset, dtype):
        base = torch.randn(batch, width, device="cuda").to(dtype)
        return base[:, offset:offset + num_classes]

    vis, txt = (rows(o, dtype).detach().requires_grad_() for o in (vis_offset, txt_offset))
    target = torch.randint(0, num_classes, (batch,), device="cuda")
    target[::3] = -100
    if kind == "probs":  # fp32 rows (fp64 for fp64), at the logits' column offset
        target = rows(vis_offset, torch.float64 if dtype == torch.float64 else torch.float32)
        target.copy_(target.softmax(1))  # in place: the rows keep their offset
    smoothing = 0.0 if kind == "index" else 0.1
    loss = tesloss.fused_tes_loss(vis, txt, target, reduction=reduction,
                                  label_smoothing=smoothing)
    loss.sum().backward()
    torch.cuda.synchronize()
    print(f"B={batch} C={num_classes} {dtype} {reduction} {kind}: "
          f"loss {loss.sum().item():.4f}")
EOF
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# Without the caching allocator each tensor is its own allocation, so an access
# past a tensor's end is past an allocation's end, where memcheck sees it.
step memcheck 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
  --error-exitcode 1 --print-limit 20 "$PY" "$LOGS/sanitize_case.py"
step racecheck 45 "$sanitizer" --tool racecheck --error-exitcode 1 --print-limit 20 \
  "$PY" "$LOGS/sanitize_case.py"

if [[ -z "${BENCH_ARGS:-}" ]]; then
  bench bench_fp16 90 --shapes "$JUDGED_SHAPES" --dtypes fp16
  bench bench_rest 120 --shapes 256x100,1024x1000,256x21843 --dtypes fp32,bf16,fp16
fi

step cpu_tests 400 env TESLOSS_REQUIRE_EXTENSION=1 CI=1 "$PY" -m pytest -q -rfE \
  -p no:cacheprovider "${timeout_plugin[@]}" -m "not cuda and not cuda_emulated" tests

{
  echo "tesloss GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS}s of ${BUDGET}s"
  echo "results: $RESULTS"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "backend: $(grep -h '"extension_loaded"' "$LOGS/build.log" 2>/dev/null | tail -n 1)"
  [[ -f "$LOGS/check.log" ]] && echo "check: $(grep -m 1 '^tesloss check: ' "$LOGS/check.log")"
  for name in cuda_tests cpu_tests; do
    [[ -f "$LOGS/$name.log" ]] &&
      echo "$name: $(grep -E '(passed|failed|error|skipped)' "$LOGS/$name.log" | tail -n 1)"
  done
  for name in memcheck racecheck; do
    [[ -f "$LOGS/$name.log" ]] &&
      echo "$name: $(grep -h 'ERROR SUMMARY\|RACECHECK SUMMARY' "$LOGS/$name.log" | tail -n 1)"
  done
  [[ -f "$RESULTS/bench_cuda.csv" ]] &&
    echo "bench: $(($(wc -l <"$RESULTS/bench_cuda.csv") - 1)) rows in bench_cuda.csv"
  true
} | tee "$RESULTS/summary.txt"

tar -czf "$RESULTS/logs.tar.gz" -C "$RESULTS" logs
if [[ -n "${OUT:-}" && "$(cd "$RESULTS" && pwd)" == "$(cd "$OUT" && pwd)" ]]; then
  rm -rf "$LOGS"
fi
exit "$FAILED"
