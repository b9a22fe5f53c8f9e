// Per-element math of the fused softmax + KL losses (semantics 3): Hinton KD (all reductions,
// teacher given as logits, probs or log-probs), per-sample KL and the DeiT soft term.
// Shared by csrc/cpu/kd_loss.cpp (and any device kernel).
//
// Per row, with u = zs / T, log ps = u - lse(u), pt and log pt from the teacher kind:
//   KL = sum_c pt (log pt - log ps)
//   dKL/dzs = (ps * sum(pt) - pt) / T
//   dKL/dzt = pt (log pt - log ps - KL) / T       (teacher logits)
//           = pt (log pt - log ps + 1)            (teacher log-probs: pt = exp(zt))
//           = log pt + 1 - log ps                 (teacher probs)
// For teacher logits, log pt - log ps = w + const with w = zt / T - zs / T, so
//   T dKL/dzt = pt (w - sum_j pt_j w_j) = pt ((w - w_top) + sum_j pt_j (w_top - w_j))
// with w_top the w of the teacher's top class: the form without cancellation when that class
// holds nearly all the mass (teacher_logit_grad).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "macros.h"

namespace kdfast::kd {

enum class Teacher : int { kLogits = 0, kProbs = 1, kLogProbs = 2 };
enum class Reduction : int { kBatchMean = 0, kSum = 1, kMean = 2, kNone = 3 };

inline Teacher parse_teacher(const std::string& kind) {
  if (kind == "logits") return Teacher::kLogits;
  if (kind == "probs") return Teacher::kProbs;
  if (kind == "log_probs") return Teacher::kLogProbs;
  throw std::invalid_argument("kd_loss: teacher must be logits, probs or log_probs, got " + kind);
}

inline Reduction parse_reduction(const std::string& name) {
  if (name == "batchmean") return Reduction::kBatchMean;
  if (name == "sum") return Reduction::kSum;
  if (name == "mean") return Reduction::kMean;
  if (name == "none") return Reduction::kNone;
  throw std::invalid_argument("kd_loss: unknown reduction " + name);
}

// Weight of each kept row's loss in the reduced loss (kept = number of kept rows).
inline double row_weight(Reduction reduction, double kept, int64_t columns) {
  switch (reduction) {
    case Reduction::kBatchMean:
      return 1.0 / kept;
    case Reduction::kMean:
      return 1.0 / (kept * static_cast<double>(columns));
    default:
      return 1.0;
  }
}

// pt * (log pt - log ps), with 0 log 0 = 0 for cached probabilities (xlogy).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t kl_term(acc_t pt, acc_t log_pt, acc_t log_ps, Teacher kind) {
  if (kind == Teacher::kProbs) return (pt == acc_t(0) ? acc_t(0) : pt * log_pt) - pt * log_ps;
  return pt * (log_pt - log_ps);
}

// T dKL/dzt for teacher logits (the caller divides by T): pt ((w - w_top) + a), w = zt / T -
// zs / T, w_top its value at the teacher's top class (the same rounded value, so that the
// top class gets pt a), a = sum_j pt_j (w_top - w_j) summed term by term. Not
// pt (log pt - log ps - KL): at a top class holding all but eps of the mass, log pt - log ps
// and KL (hundreds for extreme logits) differ by about eps times the spread of w, which
// float32 cannot resolve once eps is below about 1e-7: their rounding errors swamp it.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t teacher_logit_grad(acc_t pt, acc_t w, acc_t w_top, acc_t a) {
  return pt * ((w - w_top) + a);
}

// dKL/d(teacher input) for teacher probs or log-probs; see the header comment.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t teacher_grad(acc_t pt, acc_t log_pt, acc_t log_ps, Teacher kind) {
  if (kind == Teacher::kLogProbs) return pt * (log_pt - log_ps + acc_t(1));
  return log_pt + acc_t(1) - log_ps;
}

}  // namespace kdfast::kd
