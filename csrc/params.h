// The op's constants and its scalar parameters, each defined once. The kernels
// read them through tes_loss.h; ops.cpp builds the schemas, the argument checks
// and autograd's saved copy from them, and exports them to Python
// (tesloss._ops), which fills its fake kernels and names the logged parts
// with them. Plain C++, for host and device code alike.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

namespace tesloss {

// Columns of the [B, kNumRowStats] tensor the forward saves for the backward
// and for the logged parts, and their names in Python. The backward rebuilds
// softmax(z) and softmax(t / tau) from each row's maxima and sums of
// exponentials rather than from log-sum-exps, so that a large logit offset is
// never rounded into the exponent (tes_loss.h).
enum RowStat : int {
  kRowLoss,
  kRowMaxVis,  // max of z
  kRowSumVis,  // sum of exp(z - max z), >= 1
  kRowMaxTxt,  // max of t, in the units of t (not of t / tau)
  kRowSumTxt,  // sum of exp((t - max t) / tau), >= 1
  kRowMass,    // sum of the target row Y: 1 for a class index
  kRowCeVis,   // CE_eps(z, Y), the vision loss against the (smoothed) target alone
  kRowKlRef,   // KL(p_ref || p_v)
  kRowCeTxt,   // CE_eps(s, Y)
  kNumRowStats,
};
inline constexpr const char* kRowStatNames[kNumRowStats] = {
    "loss", "max_vis", "sum_vis", "max_txt", "sum_txt", "mass", "ce_vision", "kl_ref", "ce_text"};

// Entries of the [kNumBatchStats] tensor: the count of rows that are not
// ignored (every row, for probability targets), and the means of the parts
// over those rows. The parts' names are
// the fields of tesloss.Parts.
enum BatchStat : int {
  kBatchValid,
  kBatchCeVis,
  kBatchKlRef,
  kBatchCeTxt,
  kNumBatchStats,
};
inline constexpr const char* kBatchStatNames[kNumBatchStats] = {
    "num_valid", "ce_vision", "kl_ref", "ce_text"};

// The numbering of at::Reduction, so the codes are PyTorch's own.
enum Reduction : int64_t { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };
inline constexpr const char* kReductionNames[kReduceSum + 1] = {"none", "mean", "sum"};

// Accumulation type: fp64 for fp64 logits, fp32 for every other dtype. The
// loss and the row and batch statistics come back in it. Sums over the rows of
// a batch are kept in fp64 with a compensation term (batch_sum.h's BatchSum),
// whatever the logits' dtype.
template <typename scalar_t>
using acc_t_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline constexpr double kInf = std::numeric_limits<double>::infinity();
inline constexpr double kLog2e = 1.44269504088896340736;

// The smallest tau the kernels take for an accumulation type: 1 / tau, times
// log2(e) where the exponential is taken in base 2, must be finite in it.
template <typename acc_t>
inline constexpr double kMinTau = kLog2e / static_cast<double>(std::numeric_limits<acc_t>::max());

// The scalar parameters of both ops, in schema order, each with the condition
// its `value` must meet and the words that say so. The schemas, the Params
// struct, the checks and autograd's saved copy are all built from this table,
// so a new parameter is one line here plus its use in the math.
//   X(C++ type, name, schema type, condition, what the condition asks for)
#define TESLOSS_FOR_EACH_PARAM(X)                                                            \
  X(double, tau, "float", value > 0 && value < kInf, "a finite number > 0")                 \
  X(double, lambda_v, "float", value >= 0 && value <= 1, "a number in [0, 1]")              \
  X(double, lambda_t, "float", value >= 0 && value < kInf, "a finite number >= 0")          \
  X(int64_t, ignore_index, "int", true, "an int")                                           \
  X(int64_t, reduction, "int", value >= kReduceNone && value <= kReduceSum,                 \
    "0 (none), 1 (mean) or 2 (sum)")                                                         \
  X(double, label_smoothing, "float", value >= 0 && value <= 1, "a number in [0, 1]")

// The op's parameters as the schema passes them. Kernels take the row math's
// share of them in their accumulation type (RowParams, below).
struct Params {
#define TESLOSS_PARAM_MEMBER(type, name, ...) type name;
  TESLOSS_FOR_EACH_PARAM(TESLOSS_PARAM_MEMBER)
#undef TESLOSS_PARAM_MEMBER
};

#define TESLOSS_COUNT_PARAM(...) +1
inline constexpr int kNumParams = 0 TESLOSS_FOR_EACH_PARAM(TESLOSS_COUNT_PARAM);
#undef TESLOSS_COUNT_PARAM

// What a row's target is, and so what its statistics hold besides the
// softmax's (tes_loss.h's RowState):
//   kIndexTarget          a class index, no smoothing: the published recipe
//   kSmoothedIndexTarget  a class index with label smoothing: adds the row's
//                         uniform gaps, sum_c (max - x_c)
//   kProbTarget           a row of class probabilities Y, smoothed or not: adds
//                         the uniform gaps, Y's mass and its weighted gaps
enum TargetKind : int { kIndexTarget, kSmoothedIndexTarget, kProbTarget };

template <int kTarget>
inline constexpr bool kHasUniform = kTarget != kIndexTarget;
template <int kTarget>
inline constexpr bool kHasProbs = kTarget == kProbTarget;

// What the row math needs of the parameters, in the accumulation type.
// txt_exp_hi + txt_exp_lo is log2(e) / tau to twice the type's precision: the
// forward takes the text weights 2^((t - max t) * log2(e) / tau) from that
// split (tes_loss.h's text_exp), so that a weight far below the max is as
// accurate as one near it.
template <typename acc_t>
struct RowParams {
  acc_t inv_tau;
  acc_t lambda_v;
  acc_t lambda_t;
  int64_t ignore_index;
  acc_t txt_exp_hi;
  acc_t txt_exp_lo;
  acc_t smoothing;        // label_smoothing, eps
  acc_t inv_num_classes;  // 1 / C
};

template <typename acc_t>
inline RowParams<acc_t> row_params(const Params& p, int64_t num_classes) {
  const double scale = kLog2e / p.tau;
  const acc_t hi = static_cast<acc_t>(scale);
  return RowParams<acc_t>{static_cast<acc_t>(1.0 / p.tau), static_cast<acc_t>(p.lambda_v),
                          static_cast<acc_t>(p.lambda_t), p.ignore_index,
                          hi, static_cast<acc_t>(scale - static_cast<double>(hi)),
                          static_cast<acc_t>(p.label_smoothing),
                          static_cast<acc_t>(1.0 / static_cast<double>(num_classes))};
}

}  // namespace tesloss
