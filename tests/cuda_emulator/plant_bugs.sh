#!/usr/bin/env bash
# Plants each bug below in a copy of csrc/ and runs the emulated CUDA tests on
# it: test_cuda_emulated.py's, then the properties every device runs (on the
# emulated device), stopping at the first failure. Every bug must make one fail
# (docs/DESIGN.md has the last counts). Run from the repository root; a caught
# bug takes about a minute, a missed one the whole emulated run.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# Each bug: what it is | the file under csrc/ | the sed script that plants it.
bugs=(
  "the warp merge skips a level|cuda/row_groups.cuh|s/lane_mask > 0; lane_mask \/= 2)/lane_mask > 0; lane_mask \/= 4)/"
  "the finish kernel's tree skips a level|cuda/row_groups.cuh|/tes_finish_kernel(/,/^}/ s/half > 0; half \/= 2)/half > 0; half \/= 4)/"
  "group_merge reuses its warp states without waiting|cuda/row_groups.cuh|0,/^    __syncthreads();  \/\/ the previous row/s//    \/\/ removed:/"
  "the single pass's count of rows skips a level|cuda/row_groups.cuh|/tes_count_kernel(/,/^}/ s/half > 0; half \/= 2)/half > 0; half \/= 4)/"
  "the single pass reads a row's statistics before they are written|cuda/tes_loss_cuda.cu|s/^      __syncthreads();  \/\/ thread 0's statistics/      \/\/ removed:/"
  "the backward's scaling skips columns|cuda/tes_loss_cuda.cu|s/col < C; col += kScaleThreads)/col < C; col += 2 * kScaleThreads)/"
)
status=0
for bug in "${bugs[@]}"; do
  what=${bug%%|*}
  rest=${bug#*|}
  file=${rest%%|*}
  copy=$(mktemp -d)
  cp -r csrc "$copy/"
  sed -i "${rest#*|}" "$copy/csrc/$file"
  if cmp -s "csrc/$file" "$copy/csrc/$file"; then
    echo "NOT PLANTED ($what): its line is gone from csrc/$file"
    status=1
    continue
  fi
  summary=$(TESLOSS_EMULATOR_CSRC="$copy/csrc" CI=1 "$PY" -m pytest -q -x -p no:cacheprovider \
    -m cuda_emulated tests/test_cuda_emulated.py tests/test_single_pass.py tests/test_fused_loss.py \
    tests/test_targets.py \
    tests/test_numerics.py tests/test_identities.py 2>&1 | tail -1)
  # "N failed", not "N xfailed": the suite's expected failures are no catch.
  if [[ $summary =~ [0-9]+\ failed ]]; then
    echo "caught ($what): $summary"
  else
    echo "MISSED ($what): $summary"
    status=1
  fi
  rm -rf "$copy"
done
exit $status
