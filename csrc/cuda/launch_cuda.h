// Host entry points of the CUDA kernels (kernels_cuda.cu), in plain C++ and CUDA runtime types so
// that the kernel file needs no torch header. bindings_cuda.cpp checks the arguments and calls
// these with raw device pointers on the current stream. Each launcher is exactly one kernel
// launch (none when there is no work), and none of them reads device memory on the host: the
// kernels find their tensors in the bucket's device-side tables (zenith_fused/_table.py).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common.h"

namespace zenith_fused::cuda {

// partials[c] = sum over chunk c of g^2 (in float32, float64 for Double), one block per chunk
// with a fixed-order reduction: the same bits on every run. `tensors` int64 [N, 6] and `chunks`
// int64 [num_chunks, 2] are the device tables. One block per chunk: gridDim.x allows 2^31 - 1,
// a chunk table of 32 GiB.
cudaError_t launch_sq_norm_partials(ScalarKind kind, const int64_t* tensors, const int64_t* chunks,
                                    int64_t num_chunks, int64_t chunk_size, float* partials,
                                    cudaStream_t stream);

// The history tensors, by name (history_field order).
struct HistoryPointers {
  int64_t* step;
  float* norm_window;
  int64_t window_size;
  float* window_max;
  int64_t* skipped_steps;
  float* grad_norm;
  float* lr_scale;
  int32_t* step_applied;
  float* grad_multiplier;
  const int64_t* warmup_steps;
};

// Steps 2-3 of zenith_fused/reference.py in one single-block kernel; sums in double, fixed order,
// rounded once to float (zenith_fused/layout.py).
// grad_scale and found_inf may be null (no GradScaler); clipping is on when has_max_grad_norm.
cudaError_t launch_update_history(const float* partials, int64_t num_partials, HistoryPointers history,
                                  const float* grad_scale, const float* found_inf, bool has_max_grad_norm,
                                  float max_grad_norm, cudaStream_t stream);

// Step 4 of zenith_fused/reference.py in the compute dtype of `kind`. hyperparams is the
// [groups, hyperparam::kColumns] table in that compute dtype (float, or double for Double);
// lr_ptrs[g] is the device address of group g's lr, of the same type. lr_scale, step,
// step_applied and grad_multiplier are read on the device. has_momentum: whether any tensor has a
// momentum buffer (otherwise a kernel that never touches buffers runs).
cudaError_t launch_momentum_update(ScalarKind kind, const int64_t* tensors, const int64_t* chunks,
                                   int64_t num_chunks, int64_t chunk_size, bool has_momentum,
                                   const void* hyperparams, const int64_t* lr_ptrs, const float* lr_scale,
                                   const int64_t* step, const int32_t* step_applied,
                                   const float* grad_multiplier, cudaStream_t stream);

}  // namespace zenith_fused::cuda
