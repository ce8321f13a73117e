// The AVX2 build of kernels_cpu.h (256-bit vectors, F16C conversions); isa_prelude.h says why
// the instruction set comes from a pragma rather than from compiler flags.
#include "multi_tensor_cpu.h"

#if ZENITH_FUSED_X86_ISA_BUILDS
#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic push
// Vectorized<BFloat16>'s operators pass __m256/__m512 through lambdas whose static invokers do
// not inherit the pragma; GCC warns about their ABI although nothing here calls them.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_cpu.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace zenith_fused::cpu {
// Baseline code (after pop_options): it only takes the kernels' addresses.
KernelSet avx2_kernels() {
  return {"AVX2", &AVX2::sq_norm_partials, &AVX2::momentum_update, &AVX2::momentum_update_f64};
}
}  // namespace zenith_fused::cpu

#else

namespace zenith_fused::cpu {
KernelSet avx2_kernels() {
  return {"AVX2", nullptr, nullptr, nullptr};
}
}  // namespace zenith_fused::cpu

#endif
