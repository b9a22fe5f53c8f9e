// Constants of the Pade scaling-and-squaring exponential (semantics 6), shared by the ATen
// path (csrc/expm_op.cpp) and the fused small-matrix kernel (csrc/expm_small.h), as
// functions so that host and device code read the same literals.
#pragma once

#include "macros.h"

namespace kdfast::expm {

// Diagonal Pade numerator coefficient b_j = (2m - j)! / (j! (m - j)!) of degree m.
KDFAST_HOST_DEVICE double pade_coeff(int m, int j) {
  switch (m) {
    case 3: {
      const double b[] = {120.0, 60.0, 12.0, 1.0};
      return b[j];
    }
    case 5: {
      const double b[] = {30240.0, 15120.0, 3360.0, 420.0, 30.0, 1.0};
      return b[j];
    }
    case 7: {
      const double b[] = {17297280.0, 8648640.0, 1995840.0, 277200.0,
                          25200.0,    1512.0,    56.0,      1.0};
      return b[j];
    }
    case 9: {
      const double b[] = {17643225600.0, 8821612800.0, 2075673600.0, 302702400.0, 30270240.0,
                          2162160.0,     110880.0,     3960.0,       90.0,        1.0};
      return b[j];
    }
    default: {
      const double b[] = {64764752532480000.0, 32382376266240000.0, 7771770303897600.0,
                          1187353796428800.0,  129060195264000.0,   10559470521600.0,
                          670442572800.0,      33522128640.0,       1323241920.0,
                          40840800.0,          960960.0,            16380.0,
                          182.0,               1.0};
      return b[j];
    }
  }
}

// Degrees in increasing order: float64 uses {3, 5, 7, 9, 13}, float32 {3, 5, 7}.
KDFAST_HOST_DEVICE int num_degrees(bool is_double) { return is_double ? 5 : 3; }
KDFAST_HOST_DEVICE int degree(int i) {
  const int d[] = {3, 5, 7, 9, 13};
  return d[i];
}

// theta_m (exponential) or l_m (joint exponential + Frechet) of degree index i.
KDFAST_HOST_DEVICE double threshold(bool is_double, bool frechet, int i) {
  const double theta64[] = {1.495585217958292e-2, 2.539398330063230e-1, 9.504178996162932e-1,
                            2.097847961257068, 5.371920351148152};
  const double theta32[] = {4.258730016922831e-1, 1.880152677804762, 3.925724783138660};
  const double ell64[] = {1.08e-2, 2.00e-1, 7.83e-1, 1.78, 4.74};
  const double ell32[] = {0.308033, 1.48253, 3.24867};
  if (is_double) return frechet ? ell64[i] : theta64[i];
  return frechet ? ell32[i] : theta32[i];
}

// 1 / |c_{2m+1}| of the backward-error series (Al-Mohy-Higham 2009 rounding check).
KDFAST_HOST_DEVICE double error_coeff(int i) {
  const double c[] = {100800.0, 10059033600.0, 4487938430976000.0, 5914384781877411840000.0,
                      113250775606021113483283660800000000.0};
  return c[i];
}

// log2 of the unit roundoff.
KDFAST_HOST_DEVICE double log2_unit_roundoff(bool is_double) { return is_double ? -53.0 : -24.0; }

}  // namespace kdfast::expm
