// The batch's share of the math: exact sums of the row statistics over the
// rows that count, and the loss and logged parts they make. Shared by the CPU
// kernel and the CUDA kernels like the row math it follows (tes_loss.h).
#pragma once

#include <cstdint>

#include "tes_loss.h"

namespace tesloss {

// A sum over a batch's rows: fp64 with Neumaier's compensation, in a fixed
// order, so a mean over millions of rows is correctly rounded to the
// accumulation type and the result does not depend on the thread count.
// Zero-initialize it (= {}): no constructor, so that CUDA can keep it in
// shared memory.
struct BatchSum {
  double hi;
  double lo;

  TESLOSS_HD void add(double x) {
    const double t = hi + x;
    // The rounding error of hi + x, exactly (Neumaier's branch picks the larger term).
    lo += (hi >= x || hi <= -x) ? (hi - t) + x : (x - t) + hi;
    hi = t;
  }
  TESLOSS_HD void add(const BatchSum& other) {
    add(other.hi);
    lo += other.lo;
  }
  // An infinite or nan sum is that (its compensation would be nan).
  TESLOSS_HD double value() const { return hi - hi == 0 ? hi + lo : hi; }
};

// Sums of the row statistics that make the batch's loss and logged parts.
enum BatchSumIndex : int {
  kSumLoss, kSumCeVis, kSumKlRef, kSumCeTxt, kSumCeRef, kSumEntRef, kNumBatchSums
};

template <typename acc_t>
TESLOSS_HD void add_row(BatchSum (&sums)[kNumBatchSums], const acc_t* row) {
  sums[kSumLoss].add(row[kRowLoss]);
  sums[kSumCeVis].add(row[kRowCeVis]);
  sums[kSumKlRef].add(row[kRowKlRef]);
  sums[kSumCeTxt].add(row[kRowCeTxt]);
  sums[kSumCeRef].add(row[kRowCeRef]);
  sums[kSumEntRef].add(row[kRowEntRef]);
}

// The batch's loss and logged parts from the sums over the `num_valid` rows
// that are not ignored. "mean" over zero rows is 0 / 0 = nan, as in
// F.cross_entropy.
template <typename acc_t>
TESLOSS_HD void batch_finalize(const BatchSum (&sums)[kNumBatchSums], int64_t num_valid,
                               int64_t reduction, acc_t* loss_out, acc_t* batch_stats) {
  const double n = static_cast<double>(num_valid);
  if (reduction != kReduceNone) {
    const double loss = sums[kSumLoss].value();
    *loss_out = static_cast<acc_t>(reduction == kReduceMean ? loss / n : loss);
  }
  batch_stats[kBatchValid] = static_cast<acc_t>(num_valid);
  batch_stats[kBatchCeVis] = static_cast<acc_t>(sums[kSumCeVis].value() / n);
  batch_stats[kBatchKlRef] = static_cast<acc_t>(sums[kSumKlRef].value() / n);
  batch_stats[kBatchCeTxt] = static_cast<acc_t>(sums[kSumCeTxt].value() / n);
  batch_stats[kBatchCeRef] = static_cast<acc_t>(sums[kSumCeRef].value() / n);
  batch_stats[kBatchEntRef] = static_cast<acc_t>(sums[kSumEntRef].value() / n);
}

}  // namespace tesloss
