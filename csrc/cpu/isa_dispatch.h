// Run-time ISA dispatch of the CPU hot kernels (csrc/cpu/logit_rows.h and the logit losses,
// csrc/cpu/rkd_angle.cpp): an entry point is built twice, for AVX2 (+FMA) and for baseline
// x86-64, and picked per call by a cached __builtin_cpu_supports check (KDFAST_ROW_DISPATCH,
// KDFAST_ROW_DISPATCH_NO_FMA).
// Its helpers are KDFAST_INLINE (always inline), so they are compiled into each variant with
// that variant's ISA.
// (Not GCC target_clones: "arch=haswell" is resolved by CPU model, so AMD CPUs would run
// the baseline clone, and the "arch=x86-64-v3" resolver picks the baseline clone in this
// shared library too (GCC 12; it works in an executable).)
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define KDFAST_X86_DISPATCH 1
#define KDFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define KDFAST_TARGET_AVX2_NO_FMA __attribute__((target("avx2")))
#endif
// Helpers are inlined into the dispatched entry points, so they get their ISA.
#define KDFAST_INLINE inline __attribute__((always_inline))

namespace kdfast::isa {

#ifdef KDFAST_X86_DISPATCH
// Whether this CPU has AVX2 (and FMA): feature bits, not the CPU model; checked once.
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
inline bool cpu_has_avx2_fma() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("fma");
  return has;
}
// Defines `ret name params` returning `impl args`, built with the function attribute
// `target` (as name##_avx2, used when `has()`) and for baseline x86-64 (name##_base).
// `impl` must be KDFAST_INLINE; a template-id with commas goes in parentheses, e.g.
// `(body<true, false>)`.
#define KDFAST_ISA_DISPATCH(target, has, ret, name, params, args, impl) \
  target ret name##_avx2 params { return impl args; }                   \
  ret name##_base params { return impl args; }                          \
  ret name params { return has() ? name##_avx2 args : name##_base args; }
#else
inline bool cpu_has_avx2() { return false; }
inline bool cpu_has_avx2_fma() { return false; }
#define KDFAST_ISA_DISPATCH(target, has, ret, name, params, args, impl) \
  ret name params { return impl args; }
#endif

}  // namespace kdfast::isa

// The entry point `name` for AVX2+FMA CPUs and the baseline. GCC contracts a * b + c into
// an FMA where the target has one (C++ defaults to -ffp-contract=fast), so the two variants
// may differ in the last bits.
#define KDFAST_ROW_DISPATCH(ret, name, params, args, impl)                                     \
  KDFAST_ISA_DISPATCH(KDFAST_TARGET_AVX2, ::kdfast::isa::cpu_has_avx2_fma, ret, name, params, \
                      args, impl)
// The same with an AVX2 variant built without FMA (used on any AVX2 CPU): nothing is
// contracted, so element-wise vector code (no reassociation) gives bit-identical results in
// both variants.
#define KDFAST_ROW_DISPATCH_NO_FMA(ret, name, params, args, impl)                     \
  KDFAST_ISA_DISPATCH(KDFAST_TARGET_AVX2_NO_FMA, ::kdfast::isa::cpu_has_avx2, ret, name, \
                      params, args, impl)
