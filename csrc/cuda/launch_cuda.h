// Host entry points of the CUDA kernels (kernels_cuda.cu), in plain C++ and CUDA runtime types
// so that the kernel file needs no torch header. bindings_cuda.cpp checks the tensors and calls
// these with raw pointers on the current stream. Every pointer is device memory.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common.h"

namespace zenith_fused::cuda {

struct NormTensor {
  const void* grad;
  int64_t numel;
};

struct UpdateTensor {
  void* param;
  const void* grad;
  void* momentum_buffer;   // null when the tensor's group has no momentum
  int64_t* momentum_step;  // null likewise
  int64_t numel;
  int32_t hyperparam_slot;
};

// The number of partials sq_norm_partials writes: one per chunk of every non-empty tensor.
int64_t count_chunks(const NormTensor* tensors, int64_t num_tensors, int64_t chunk_size);

// partials[k] = sum of float(g)^2 over the k-th chunk (tensor order), each partial a fixed-order
// reduction inside one block: the same bits on every run.
cudaError_t launch_sq_norm_partials(ScalarKind kind, const NormTensor* tensors, int64_t num_tensors,
                                    int64_t chunk_size, float* partials, cudaStream_t stream);

// Steps 1-3 of zenith_fused/reference.py in one single-block kernel; sums in double, fixed order.
// grad_scale and found_inf may be null (no GradScaler); clipping is on when has_max_grad_norm.
cudaError_t launch_update_history(const float* partials, int64_t num_partials, int64_t* step,
                                  float* norm_window, int64_t window_size, float* window_max,
                                  int64_t* skipped_steps, float* grad_norm, float* lr_scale,
                                  int32_t* step_applied, float* grad_multiplier, const float* grad_scale,
                                  const float* found_inf, bool has_max_grad_norm, float max_grad_norm,
                                  cudaStream_t stream);

// Step 4 of zenith_fused/reference.py; lr_scale, step, step_applied and grad_multiplier are read
// on the device.
// hyperparams is the float32 [groups, hyperparam::kColumns] table. has_momentum: whether any
// tensor has a momentum buffer (otherwise the kernel that never touches buffers runs).
cudaError_t launch_momentum_update(ScalarKind kind, const UpdateTensor* tensors, int64_t num_tensors,
                                   int64_t chunk_size, bool has_momentum, const float* hyperparams,
                                   const float* lr_scale, const int64_t* step,
                                   const int32_t* step_applied, const float* grad_multiplier,
                                   cudaStream_t stream);

}  // namespace zenith_fused::cuda
