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

// dKL/d(teacher input) times T for logits (the caller divides by T); see the header comment.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t teacher_grad(acc_t pt, acc_t log_pt, acc_t log_ps, acc_t kl,
                                      Teacher kind) {
  if (kind == Teacher::kLogits) return pt * (log_pt - log_ps - kl);
  if (kind == Teacher::kLogProbs) return pt * (log_pt - log_ps + acc_t(1));
  return log_pt + acc_t(1) - log_ps;
}

}  // namespace kdfast::kd
