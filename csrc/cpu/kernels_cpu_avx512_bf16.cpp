// The AVX512 build of kernels_cpu.h's update with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4
// and later): the bfloat16 update converts its results with VCVTNE2PS2BF16 (see store_update_pair
// in kernels_cpu.h); everything else is the AVX512 build's. ATen has no such capability, so the
// harness picks this build itself, when the processor has the instructions and
// ATEN_CPU_CAPABILITY does not name a build (multi_tensor_cpu.cpp).
#include "multi_tensor_cpu.h"

// GCC 10 is the first with both the avx512bf16 target and __builtin_cpu_supports("avx512bf16").
#if ZENITH_FUSED_X86_ISA_BUILDS && __GNUC__ >= 10
#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#pragma GCC diagnostic push
// As in kernels_cpu_avx512.cpp.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CPU_CAPABILITY AVX512_BF16
#define CPU_CAPABILITY_AVX512
#define ZENITH_FUSED_AVX512_BF16
#include "kernels_cpu.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace zenith_fused::cpu {
// Only the update differs from the AVX512 build; the norm and the float64 update are its own.
KernelSet avx512_bf16_kernels() {
  const KernelSet avx512 = avx512_kernels();
  if (!__builtin_cpu_supports("avx512bf16") || avx512.momentum_update == nullptr) {
    return {"AVX512_BF16", nullptr, nullptr, nullptr};
  }
  return {"AVX512_BF16", avx512.sq_norm_partials, &AVX512_BF16::momentum_update, avx512.momentum_update_f64};
}
}  // namespace zenith_fused::cpu

#else

namespace zenith_fused::cpu {
KernelSet avx512_bf16_kernels() {
  return {"AVX512_BF16", nullptr, nullptr, nullptr};
}
}  // namespace zenith_fused::cpu

#endif
