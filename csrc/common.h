// Definitions shared by the CPU and CUDA kernels of zenith_fused and their bindings.
//
// Deliberately free of torch and CUDA headers: the per-instruction-set CPU kernel files and the
// plain-CUDA kernel file include it too. The column numbers and the history order repeat
// zenith_fused/layout.py, the one definition; tests/test_layout.py fails when they drift (it also
// reads the History and HistoryPointers structs, which list the fields by name in this order).
#pragma once

#include <cstdint>

// The small helpers below run in host code and in CUDA kernels alike.
#ifdef __CUDACC__
#define ZENITH_FUSED_HOST_DEVICE __host__ __device__
#else
#define ZENITH_FUSED_HOST_DEVICE
#endif

namespace zenith_fused {

// The storage types the fused kernels read and write. Arithmetic is float32 for the first three
// and float64 for Double (zenith_fused.reference.compute_dtype).
enum class ScalarKind : int8_t { Float, Half, BFloat16, Double };

// Columns of the int64 [N, kColumns] tensor table, one row per tensor (layout.TENSOR_COLUMNS).
namespace tensor_column {
constexpr int kParam = 0;
constexpr int kGrad = 1;
constexpr int kMomentumBuffer = 2;
constexpr int kMomentumStep = 3;
constexpr int kNumel = 4;
constexpr int kHyperparamSlot = 5;
constexpr int kAligned = 6;  // 1: parameter, gradient and buffer start 16-byte aligned
constexpr int kColumns = 7;
}  // namespace tensor_column

// Columns of the int64 [C, kColumns] chunk table, one row per chunk: the row of its tensor in the
// tensor table and its first element. Chunk c's squared-norm partial goes to slot c.
namespace chunk_column {
constexpr int kTensor = 0;
constexpr int kStart = 1;
constexpr int kColumns = 2;
}  // namespace chunk_column

// Columns of the [G, kColumns] hyper-parameter table (compute dtype), one row per parameter
// group (layout.HYPERPARAM_COLUMNS). The kernels read a group's lr through lr_ptrs, never kLr.
namespace hyperparam {
constexpr int kLr = 0;
constexpr int kMomentum = 1;
constexpr int kOneMinusDampening = 2;
constexpr int kWeightDecay = 3;
constexpr int kNesterov = 4;
constexpr int kMaximize = 5;
constexpr int kColumns = 6;
}  // namespace hyperparam

// The history list of update_history, in zenith_fused.layout.HISTORY_FIELDS order.
namespace history_field {
constexpr int kStep = 0;           // int64, one element
constexpr int kNormWindow = 1;     // float32 [W], contiguous
constexpr int kWindowMax = 2;      // float32, one element
constexpr int kSkippedSteps = 3;   // int64, one element
constexpr int kGradNorm = 4;       // float32, one element
constexpr int kLrScale = 5;        // float32, one element
constexpr int kStepApplied = 6;    // int32, one element
constexpr int kGradMultiplier = 7; // float32, one element
constexpr int kWarmupSteps = 8;    // int64, one element: K
constexpr int kCount = 9;
}  // namespace history_field

// The ring-buffer slot of step t: t mod W in [0, W) for every t, also a corrupt negative one
// (C++'s % keeps the sign of t; Python's, which the reference uses, does not).
ZENITH_FUSED_HOST_DEVICE constexpr int64_t window_slot(int64_t t, int64_t window_size) {
  const int64_t r = t % window_size;
  return r < 0 ? r + window_size : r;
}

// t + 1 without signed overflow (undefined behaviour): INT64_MAX stays where it is.
ZENITH_FUSED_HOST_DEVICE constexpr int64_t next_step(int64_t t) {
  return t == INT64_MAX ? t : t + 1;
}

// The number of norms the window mean divides by: min(u, W), at least 1, as the reference's
// (new_step - K).clamp(min=1, max=W), for u = t - K.
ZENITH_FUSED_HOST_DEVICE constexpr int64_t window_count(int64_t t, int64_t window_size) {
  return t < 1 ? 1 : (t < window_size ? t : window_size);
}

}  // namespace zenith_fused
