// The AVX512 build of kernels_cpu.h (512-bit vectors; AVX512 F, BW, VL and DQ, the set ATen
// requires for its own AVX512 kernels); isa_prelude.h says why the instruction set comes from a
// pragma rather than from compiler flags.
#include "multi_tensor_cpu.h"

#if ZENITH_FUSED_X86_ISA_BUILDS
#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#pragma GCC diagnostic push
// Vectorized<BFloat16>'s operators pass __m256/__m512 through lambdas whose static invokers do
// not inherit the pragma; GCC warns about their ABI although nothing here calls them.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC's own avx512fintrin.h starts some intrinsics from _mm512_undefined_*() values.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_cpu.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace zenith_fused::cpu {
// Baseline code (after pop_options): it only takes the kernels' addresses.
KernelSet avx512_kernels() {
  return {"AVX512", &AVX512::sq_norm_partials, &AVX512::momentum_update, &AVX512::momentum_update_f64};
}
}  // namespace zenith_fused::cpu

#else

namespace zenith_fused::cpu {
KernelSet avx512_kernels() {
  return {"AVX512", nullptr, nullptr, nullptr};
}
}  // namespace zenith_fused::cpu

#endif
