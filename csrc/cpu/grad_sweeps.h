// The CPU kernels' gradient sweeps over one row: the backward's, which takes
// the row's weights again from its logits, and the single pass's, which
// writes the forward's weights (cpu/row_sweeps.h) and forms the gradients of
// them. Both give the same bits: the same weights, the same formulas
// (../tes_loss.h). Included by tes_loss_cpu.cpp only, once per CPU capability.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/row_sweeps.h"
#include "cpu/row_weights.h"
#include "cpu/vec_io.h"
#include "tes_loss.h"

namespace tesloss {
namespace cpu {

using at::vec::Vectorized;

// The gradients of a vector of columns from their weights e_vis, e_txt and,
// for a probability target, y (GradRow's formulas, tes_loss.h).
template <int kTarget, typename acc_t>
class VecGrads {
 public:
  using Vec = Vectorized<acc_t>;
  explicit VecGrads(const GradRow<acc_t>& r)
      : g_vis_(r.g_vis), g_ref_(r.g_ref), g_txt_(r.g_txt), g_uni_vis_(r.g_uni_vis),
        g_uni_txt_(r.g_uni_txt), g_y_vis_(r.g_y_vis), g_y_txt_(r.g_y_txt) {}
  void operator()(const Vec& e_vis, const Vec& e_txt, const Vec& y, Vec& gv, Vec& gt) const {
    gv = at::vec::fmsub(g_vis_, e_vis, g_ref_ * e_txt);
    gt = g_txt_ * e_txt;
    if constexpr (kHasProbs<kTarget>) {
      gv = gv - at::vec::fmadd(g_y_vis_, y, g_uni_vis_);
      gt = gt - at::vec::fmadd(g_y_txt_, y, g_uni_txt_);
    } else if constexpr (kHasUniform<kTarget>) {
      gv = gv - g_uni_vis_;
      gt = gt - g_uni_txt_;
    }
  }

 private:
  Vec g_vis_, g_ref_, g_txt_, g_uni_vis_, g_uni_txt_, g_y_vis_, g_y_txt_;
};

// The first `count` lanes of v, rounded to scalar_t, at dst.
template <typename scalar_t, typename acc_t>
void store_part(scalar_t* dst, const Vectorized<acc_t>& v, int64_t count) {
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<scalar_t>(lanes[k]);
}

// The columns before both gradient rows reach a multiple of kStreamBytes, or
// -1 where they never reach one together (or the build has no streaming).
template <typename scalar_t>
int64_t stream_head(const scalar_t* grad_vis, const scalar_t* grad_txt, int64_t C) {
  if constexpr (kStreamBytes == 0) return -1;
  const auto offset = [](const scalar_t* p) {
    return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % kStreamBytes);
  };
  if (offset(grad_vis) != offset(grad_txt) || offset(grad_vis) % sizeof(scalar_t) != 0) return -1;
  const int64_t head = (kStreamBytes - offset(grad_vis)) % kStreamBytes / sizeof(scalar_t);
  return head <= C ? head : -1;
}

// Writes both gradient rows of C columns, a vector at a time:
// grads(j, count, gv, gt) forms those of columns j.. (count < a vector only
// for a partial one, zero-padded). With `stream`, the whole vectors go past the
// caches (vec_io.h's store_streaming), after a head of columns that aligns
// them. For a class index, the label's column is written again at the end, by
// the scalar grad_column.
template <int kTarget, typename scalar_t, typename acc_t, typename Grads>
void write_grads(int64_t C, const Grads& grads, scalar_t* grad_vis, scalar_t* grad_txt,
                 bool stream) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t head = stream ? stream_head(grad_vis, grad_txt, C) : -1;
  stream = head >= 0;
  Vec gv, gt;
  int64_t j = 0;
  const auto part = [&](int64_t end) {  // columns j..end, end - j < W
    grads(j, end - j, gv, gt);
    store_part(grad_vis + j, gv, end - j);
    store_part(grad_txt + j, gt, end - j);
    j = end;
  };
  while (j < head) part(std::min(j + W, head));
  // One store of a scalar_t vector: one acc_t vector, or two for a half type,
  // converted back together, which costs what converting one alone does.
  const auto store = [&](scalar_t* dst, const Vectorized<scalar_t>& v) {
    if (stream) {
      store_streaming(dst, v);
    } else {
      v.store(dst);
    }
  };
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    Vec gv_hi, gt_hi;
    for (; j + 2 * W <= C; j += 2 * W) {
      grads(j, W, gv, gt);
      grads(j + W, W, gv_hi, gt_hi);
      store(grad_vis + j, at::vec::convert_from_float<scalar_t>(gv, gv_hi));
      store(grad_txt + j, at::vec::convert_from_float<scalar_t>(gt, gt_hi));
    }
    for (; j + W <= C; j += W) {
      grads(j, W, gv, gt);
      store_acc(grad_vis + j, gv);
      store_acc(grad_txt + j, gt);
    }
  } else {
    for (; j + W <= C; j += W) {
      grads(j, W, gv, gt);
      store(grad_vis + j, gv);
      store(grad_txt + j, gt);
    }
  }
  if (j < C) part(C);
  if (stream) streaming_fence();
}

template <int kTarget, typename acc_t>
Vectorized<acc_t> load_probs(const acc_t* probs, int64_t j, int64_t count) {
  using Vec = Vectorized<acc_t>;
  if constexpr (!kHasProbs<kTarget>) return Vec(0);
  return count < Vec::size() ? load_acc_tail<acc_t>(probs + j, count) : Vec::loadu(probs + j);
}

// The label's column of a class index target, both gradients at once.
template <int kTarget, typename scalar_t, typename acc_t>
void write_label_column(const scalar_t* vis, const scalar_t* txt, int64_t label,
                        const GradRow<acc_t>& r, scalar_t* grad_vis, scalar_t* grad_txt) {
  if constexpr (!kHasProbs<kTarget>) {
    grad_column<kTarget>(vis[label], txt[label], true, r, grad_vis[label], grad_txt[label]);
  }
}

// One row of the backward: reads z, t (and a probability target) once, writes
// both gradients once (past the caches with `stream`).
template <int kTarget, typename scalar_t, typename acc_t>
void backward_row(const scalar_t* vis, const scalar_t* txt, const acc_t* probs, int64_t C,
                  int64_t label, const GradRow<acc_t>& r, scalar_t* grad_vis, scalar_t* grad_txt,
                  bool stream) {
  // A row with a nan logit has a nan max; the vector exp need not keep that
  // nan, so such a row takes the scalar path for every column.
  if (std::isnan(r.max_vis) || std::isnan(r.max_txt)) {
    for (int64_t j = 0; j < C; ++j) {
      if constexpr (kHasProbs<kTarget>) {
        grad_column_probs(vis[j], txt[j], probs[j], r, grad_vis[j], grad_txt[j]);
      } else {
        grad_column<kTarget>(vis[j], txt[j], j == label, r, grad_vis[j], grad_txt[j]);
      }
    }
    return;
  }
  const auto exp_vis = row_vis_weights<scalar_t>(r.max_vis);
  const auto exp_txt = row_txt_weights<scalar_t>(r.max_txt, r);
  const VecGrads<kTarget, acc_t> of_weights(r);
  const auto grads = [&](int64_t j, int64_t count, auto& gv, auto& gt) {
    const bool tail = count < Vectorized<acc_t>::size();
    const auto z = tail ? load_acc_tail<acc_t>(vis + j, count) : load_acc<acc_t>(vis + j);
    const auto t = tail ? load_acc_tail<acc_t>(txt + j, count) : load_acc<acc_t>(txt + j);
    of_weights(exp_vis(z), exp_txt(t), load_probs<kTarget>(probs, j, count), gv, gt);
  };
  write_grads<kTarget, scalar_t, acc_t>(C, grads, grad_vis, grad_txt, stream);
  write_label_column<kTarget>(vis, txt, label, r, grad_vis, grad_txt);
}

// One row of the single pass: the forward's sweeps keep the row's weights in
// w_vis and w_txt (C values each: scratch, or the gradient rows themselves
// where they are acc_t and not streamed), the row is finished, and the
// gradients for upstream gradient g are formed of the kept weights, with no
// second exponential. A row whose plain sums are not finite (a nan, an
// infinity, a spread near the largest float) takes the forward's careful path
// and the backward's sweep instead.
template <int kTarget, typename scalar_t, typename acc_t>
void step_row(const scalar_t* vis, const scalar_t* txt, const acc_t* probs, int64_t C,
              int64_t label, const RowParams<acc_t>& p, acc_t g, acc_t* out, acc_t* w_vis,
              acc_t* w_txt, scalar_t* grad_vis, scalar_t* grad_txt, bool stream,
              const NextRow<scalar_t, acc_t>& next) {
  acc_t max_vis, max_txt;
  row_maxima(vis, txt, C, max_vis, max_txt);
  double mass = 0;
  const RowState<acc_t> row = sweep_state<false, kTarget, true>(
      vis, txt, probs, C, p, max_vis, max_txt, mass, w_vis, w_txt, next);
  if (!gaps_finite(row)) {
    forward_row<kTarget>(vis, txt, probs, C, label, p, out);
    backward_row<kTarget>(vis, txt, probs, C, label, grad_row<kTarget>(p, out, g), grad_vis,
                          grad_txt, stream);
    return;
  }
  finish_row<kTarget>(row, mass, vis, txt, label, p, out);
  const GradRow<acc_t> r = grad_row<kTarget>(p, out, g);
  const VecGrads<kTarget, acc_t> of_weights(r);
  const auto grads = [&](int64_t j, int64_t count, auto& gv, auto& gt) {
    using Vec = Vectorized<acc_t>;
    const bool tail = count < Vec::size();
    const Vec e_vis = tail ? Vec::loadu(w_vis + j, count) : Vec::loadu(w_vis + j);
    const Vec e_txt = tail ? Vec::loadu(w_txt + j, count) : Vec::loadu(w_txt + j);
    of_weights(e_vis, e_txt, load_probs<kTarget>(probs, j, count), gv, gt);
  };
  write_grads<kTarget, scalar_t, acc_t>(C, grads, grad_vis, grad_txt, stream);
  write_label_column<kTarget>(vis, txt, label, r, grad_vis, grad_txt);
}

}  // namespace cpu
}  // namespace tesloss
