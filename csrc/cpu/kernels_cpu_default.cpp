// The baseline build of kernels_cpu.h: compiled with the extension's ordinary flags, it runs on
// any processor and is the fallback of the instruction-set builds.
#include "multi_tensor_cpu.h"

#define CPU_CAPABILITY DEFAULT
#include "kernels_cpu.h"

namespace zenith_fused::cpu {

KernelSet default_kernels() {
  return {"DEFAULT", &DEFAULT::sq_norm_partials, &DEFAULT::momentum_update, &DEFAULT::momentum_update_f64};
}

}  // namespace zenith_fused::cpu
