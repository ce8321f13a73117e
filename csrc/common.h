// Definitions shared by the CPU and CUDA kernels of zenith_fused and their bindings.
//
// Deliberately free of torch and CUDA headers: the per-instruction-set CPU kernel files and the
// plain-CUDA kernel file include it too.
#pragma once

#include <cstdint>

namespace zenith_fused {

// The storage types the fused kernels read and write. Arithmetic is float32 for all of them,
// as in zenith_fused/reference.py (float64 parameters included).
enum class ScalarKind : int8_t { Float, Half, BFloat16, Double };

// Columns of the float32 [G, 6] hyper-parameter table, one row per parameter group; the same
// layout as zenith_fused._engines.hyperparam_rows.
namespace hyperparam {
constexpr int kLr = 0;
constexpr int kMomentum = 1;
constexpr int kOneMinusDampening = 2;
constexpr int kWeightDecay = 3;
constexpr int kNesterov = 4;
constexpr int kMaximize = 5;
constexpr int kColumns = 6;
}  // namespace hyperparam

}  // namespace zenith_fused
