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
  kRowCeRef,   // CE_eps(z, p_ref), the vision loss against the text reference alone
  kRowEntRef,  // H(p_ref), the entropy of the text reference
  kNumRowStats,
};
inline constexpr const char* kRowStatNames[kNumRowStats] = {
    "loss",    "max_vis", "sum_vis", "max_txt", "sum_txt",    "mass",
    "ce_vision", "kl_ref", "ce_text", "ce_ref", "entropy_ref"};

// Entries of the [kNumBatchStats] tensor: the count of rows that are not
// ignored (every row, for probability targets), and the means of the parts
// over those rows. The parts' names are
// the fields of tesloss.Parts.
enum BatchStat : int {
  kBatchValid,
  kBatchCeVis,
  kBatchKlRef,
  kBatchCeTxt,
  kBatchCeRef,
  kBatchEntRef,
  kNumBatchStats,
};
inline constexpr const char* kBatchStatNames[kNumBatchStats] = {
    "num_valid", "ce_vision", "kl_ref", "ce_text", "ce_ref", "entropy_ref"};

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
// 2^t rounds to 0 in float, subnormals included, for t below this.
inline constexpr float kExp2Underflow = -151.0f;
// log2(e) = kLog2eHi + kLog2eLo to twice float's precision (row_exp.h's split_exp).
inline constexpr float kLog2eHi = static_cast<float>(kLog2e);
inline constexpr float kLog2eLo = static_cast<float>(kLog2e - static_cast<double>(kLog2eHi));

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

// What the row math needs of the parameters: in the accumulation type where
// the columns use them, in double where only each row's factors do. Every
// constant derived from them (1 - lambda_v, 1 - eps, eps / C, lambda_t / tau
// and their products) is formed in double from the parameters as given and
// rounded once: formed in fp32 from lambda_v rounded to fp32, 1 - lambda_v at
// lambda_v = 0.99999 was 1.0014e-5, and every gradient of the label with it.
// txt_exp_hi + txt_exp_lo is log2(e) / tau to twice the type's precision: the
// text weights are 2^((t - max t) * log2(e) / tau) from that split
// (row_exp.h's split_exp), so that a weight far below the max is as accurate
// as one near it.
template <typename acc_t>
struct RowParams {
  acc_t inv_tau;             // 1 / tau
  acc_t lambda_v;
  acc_t one_minus_lambda_v;  // 1 - lambda_v
  acc_t lambda_t;
  int64_t ignore_index;
  acc_t txt_exp_hi;
  acc_t txt_exp_lo;
  acc_t smoothing;           // label_smoothing, eps
  acc_t one_minus_smoothing; // 1 - eps
  acc_t inv_num_classes;     // 1 / C
  // The gradients' weights, in double: each row's factors are formed from
  // them in double and rounded once (tes_loss.h's grad_row). With
  // w' = (1 - eps) q + eps / C = ref_weight p_ref + target_weight Y + uniform
  // and Y' = (1 - eps) Y + eps / C:
  double ref_weight;         // (1 - eps) lambda_v
  double target_weight;      // (1 - eps) (1 - lambda_v)
  double uniform;            // eps / C
  double off_label;          // eps (1 - 1 / C): what smoothing moves off a label
  double label_smoothing;    // eps
  double txt_target_weight;  // 1 - eps
  double lambda_t_over_tau;  // lambda_t / tau
};

template <typename acc_t>
inline RowParams<acc_t> row_params(const Params& p, int64_t num_classes) {
  const auto round = [](double x) { return static_cast<acc_t>(x); };
  const double scale = kLog2e / p.tau;
  const acc_t hi = round(scale);
  const double classes = static_cast<double>(num_classes);
  const double eps = p.label_smoothing;
  return RowParams<acc_t>{round(1.0 / p.tau),
                          round(p.lambda_v),
                          round(1.0 - p.lambda_v),
                          round(p.lambda_t),
                          p.ignore_index,
                          hi,
                          round(scale - static_cast<double>(hi)),
                          round(eps),
                          round(1.0 - eps),
                          round(1.0 / classes),
                          (1.0 - eps) * p.lambda_v,
                          (1.0 - eps) * (1.0 - p.lambda_v),
                          eps / classes,
                          eps * ((classes - 1.0) / classes),
                          eps,
                          1.0 - eps,
                          p.lambda_t / p.tau};
}

}  // namespace tesloss
