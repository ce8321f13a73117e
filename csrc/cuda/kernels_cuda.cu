// The ZENITH CUDA kernels, many tensors per launch (multi_tensor_apply.cuh).
//
// sq_norm_partials (step 1 of zenith_fused/reference.py): one block per chunk writes
//     partials[k] = sum over the chunk's elements of float32(g)^2
// into the chunk's fixed slot k; the history kernel then sums the slots in a fixed order. No
// atomics, so the norm has the same bits on every run.
// update_history (steps 2-3): n = sqrt(sum(partials)) / grad_scale; if n is finite and
// found_inf == 0: t += 1, window[(t-1) % W] = n, m = sum(window) / min(t, W), M = max(M, m),
// scale = m / M (1 when M == 0); else skipped_steps += 1. grad_multiplier = (1 / grad_scale) *
// min(1, max_grad_norm / (n + 1e-6)). One block; the host never reads any of it.
// momentum_update (step 4), per element in float32:
//     d   = sign * (g * grad_multiplier) + weight_decay * p     (the add only when weight_decay != 0)
//     buf = d if first else momentum * buf + (1 - dampening) * d     (only when momentum != 0)
//     d   = d + momentum * buf if nesterov else buf                  (only when momentum != 0)
//     p   = p - (lr * lr_scale) * d
// with lr_scale, step and step_applied read from device memory (a skipped step returns at once).
//
// Products and sums use the __f*_rn intrinsics: nvcc contracts a * b + c into an FMA by default,
// which would round differently from the reference's separate float32 operations.
//
// Plain CUDA on purpose: the CPU-only torch wheels ship the c10/cuda headers without their
// generated configuration header (c10/cuda/impl/cuda_cmake_macros.h), and ATen/cuda needs the
// CUDA math libraries' headers. With no torch header here, this file compiles with nvcc alone
// wherever nvcc exists, which is what tests/test_cuda_build.py checks on machines without a
// GPU; bindings_cuda.cpp holds everything that needs torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch_cuda.h"
#include "multi_tensor_apply.cuh"

namespace zenith_fused::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;  // independent loads in flight per thread
constexpr int kHistoryThreads = 256;

// ------------------------------------------------------------------ chunk tables
struct NormMeta {
  static constexpr int kMaxTensors = 96;
  static constexpr int kMaxBlocks = 320;
  const void* grad[kMaxTensors];
  int64_t numel[kMaxTensors];
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];

  void set_tensor(int slot, const NormTensor& t) {
    grad[slot] = t.grad;
    numel[slot] = t.numel;
  }
};

struct UpdateMeta {
  static constexpr int kMaxTensors = 36;
  static constexpr int kMaxBlocks = 320;
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  void* momentum_buffer[kMaxTensors];
  int64_t* momentum_step[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t hyperparam_slot[kMaxTensors];
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];

  void set_tensor(int slot, const UpdateTensor& t) {
    param[slot] = t.param;
    grad[slot] = t.grad;
    momentum_buffer[slot] = t.momentum_buffer;
    momentum_step[slot] = t.momentum_step;
    numel[slot] = t.numel;
    hyperparam_slot[slot] = t.hyperparam_slot;
  }
};

static_assert(sizeof(NormMeta) + 64 <= 4096, "kernel arguments must stay under 4 KiB");
static_assert(sizeof(UpdateMeta) + 64 <= 4096, "kernel arguments must stay under 4 KiB");

// ------------------------------------------------------------------ storage types
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(double x) { return __double2float_rn(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ double from_float<double>(float x) { return static_cast<double>(x); }

// ------------------------------------------------------------------ reductions
// Fixed-shape tree over the block: the same order, hence the same bits, on every run.
template <typename Acc, int kBlock>
__device__ Acc block_sum(Acc value, Acc* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int width = kBlock / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      shared[threadIdx.x] += shared[threadIdx.x + width];
    }
    __syncthreads();
  }
  const Acc total = shared[0];
  __syncthreads();  // `shared` may be reused at once
  return total;
}

// ------------------------------------------------------------------ kernels
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sq_norm_partials_kernel(NormMeta meta, int64_t chunk_size, float* partials, int64_t first_partial) {
  __shared__ float shared[kThreads];
  const int tensor = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * chunk_size;
  const int64_t size = min(chunk_size, meta.numel[tensor] - begin);
  const T* g = static_cast<const T*>(meta.grad[tensor]) + begin;

  float acc = 0.0f;
  for (int64_t base = 0; base < size; base += kThreads * kIlp) {
    float x[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + k * kThreads + threadIdx.x;
      x[k] = i < size ? to_float(g[i]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      acc = fmaf(x[k], x[k], acc);
    }
  }
  const float total = block_sum<float, kThreads>(acc, shared);
  if (threadIdx.x == 0) {
    partials[first_partial + blockIdx.x] = total;
  }
}

__global__ void __launch_bounds__(kHistoryThreads)
    update_history_kernel(const float* partials, int64_t num_partials, int64_t* step, float* norm_window,
                          int64_t window_size, float* window_max, int64_t* skipped_steps, float* grad_norm,
                          float* lr_scale, int32_t* step_applied, float* grad_multiplier,
                          const float* grad_scale, const float* found_inf, bool has_max_grad_norm,
                          float max_grad_norm) {
  __shared__ double shared[kHistoryThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += kHistoryThreads) {
    acc += partials[i];
  }
  const float inv_scale = grad_scale != nullptr ? __frcp_rn(*grad_scale) : 1.0f;
  const float norm =
      __fmul_rn(__fsqrt_rn(__double2float_rn(block_sum<double, kHistoryThreads>(acc, shared))), inv_scale);
  const bool finite = isfinite(norm) && (found_inf == nullptr || *found_inf == 0.0f);

  const int64_t t = *step;
  const int64_t slot = t % window_size;
  const int64_t new_step = finite ? t + 1 : t;
  // The new norm joins the window sum from a register, so no thread reads the slot after
  // thread 0 writes it. Unused slots hold 0: the sum over the ring is the last min(t, W).
  double window_acc = 0.0;
  for (int64_t i = threadIdx.x; i < window_size; i += kHistoryThreads) {
    window_acc += (finite && i == slot) ? norm : norm_window[i];
  }
  const double window_sum = block_sum<double, kHistoryThreads>(window_acc, shared);

  if (threadIdx.x == 0) {
    if (finite) {
      const float count = static_cast<float>(min(new_step, window_size));
      const float mean = __fdiv_rn(__double2float_rn(window_sum), count);
      const float maximum = fmaxf(*window_max, mean);
      norm_window[slot] = norm;
      *step = new_step;
      *window_max = maximum;
      *lr_scale = maximum > 0.0f ? __fdiv_rn(mean, maximum) : 1.0f;
    } else {
      *skipped_steps += 1;
    }
    float multiplier = inv_scale;
    if (has_max_grad_norm) {
      // The reference's max_grad_norm / (n + 1e-6) is a reciprocal, then a product; fminf would
      // drop a NaN that clamp keeps.
      const float clip = __fmul_rn(__frcp_rn(__fadd_rn(norm, 1e-6f)), max_grad_norm);
      multiplier = __fmul_rn(multiplier, clip < 1.0f || isnan(clip) ? clip : 1.0f);
    }
    *grad_norm = norm;
    *step_applied = finite ? 1 : 0;
    *grad_multiplier = multiplier;
  }
}

struct Coefficients {
  float grad_multiplier;
  float step_lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  float sign;
  bool nesterov;
  bool has_buffer;
  bool first;
};

// The math of one element, apart from loads and stores.
__device__ __forceinline__ void zenith_step(float& p, float g, float& buf, const Coefficients& c) {
  float d = __fmul_rn(__fmul_rn(g, c.grad_multiplier), c.sign);  // the second multiply is exact: by +-1
  if (c.weight_decay != 0.0f) {
    d = __fadd_rn(d, __fmul_rn(c.weight_decay, p));
  }
  if (c.has_buffer) {
    buf = c.first ? d : __fadd_rn(__fmul_rn(c.momentum, buf), __fmul_rn(c.one_minus_dampening, d));
    d = c.nesterov ? __fadd_rn(d, __fmul_rn(c.momentum, buf)) : buf;
  }
  p = __fsub_rn(p, __fmul_rn(c.step_lr, d));
}

template <typename T, bool kHasMomentum>
__global__ void __launch_bounds__(kThreads)
    momentum_update_kernel(UpdateMeta meta, int64_t chunk_size, const float* hyperparams,
                           const float* lr_scale, const int64_t* step, const int32_t* step_applied,
                           const float* grad_multiplier) {
  if (*step_applied == 0) {
    return;  // a skipped step (non-finite norm) changes nothing
  }
  const int tensor = meta.block_tensor[blockIdx.x];
  const int64_t chunk = meta.block_chunk[blockIdx.x];
  const int64_t begin = chunk * chunk_size;
  const int64_t size = max(int64_t{0}, min(chunk_size, meta.numel[tensor] - begin));
  const float* row = hyperparams + static_cast<int64_t>(meta.hyperparam_slot[tensor]) * hyperparam::kColumns;

  Coefficients c;
  c.grad_multiplier = *grad_multiplier;
  c.step_lr = __fmul_rn(row[hyperparam::kLr], *lr_scale);  // float32(lr) * lr_scale, as the reference
  c.momentum = row[hyperparam::kMomentum];
  c.one_minus_dampening = row[hyperparam::kOneMinusDampening];
  c.weight_decay = row[hyperparam::kWeightDecay];
  c.sign = row[hyperparam::kMaximize] != 0.0f ? -1.0f : 1.0f;
  c.nesterov = row[hyperparam::kNesterov] != 0.0f;
  // The optimizer passes a buffer for every tensor of a group with momentum; the null test only
  // keeps a malformed call from writing through a null pointer.
  c.has_buffer = kHasMomentum && c.momentum != 0.0f && meta.momentum_buffer[tensor] != nullptr;
  c.first = false;
  if (c.has_buffer) {
    // The buffer is "first" when never filled (0) or filled at this very step (by the block of
    // the tensor's first chunk, below). A block reading before or after that write sees 0 or t,
    // and both mean "first", so the blocks agree without any ordering between them.
    int64_t* filled_at = meta.momentum_step[tensor];
    const int64_t t = *step;
    const int64_t filled = *filled_at;
    c.first = filled == 0 || filled == t;
    __syncthreads();  // every thread of this block has read `filled` before it changes
    if (chunk == 0 && threadIdx.x == 0 && filled == 0) {
      *filled_at = t;
    }
  }

  T* p = static_cast<T*>(meta.param[tensor]) + begin;
  const T* g = static_cast<const T*>(meta.grad[tensor]) + begin;
  T* buf = c.has_buffer ? static_cast<T*>(meta.momentum_buffer[tensor]) + begin : nullptr;
  const bool reads_buffer = c.has_buffer && !c.first;
  for (int64_t base = 0; base < size; base += kThreads * kIlp) {
    float pv[kIlp], gv[kIlp], bv[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + k * kThreads + threadIdx.x;
      const bool in = i < size;
      pv[k] = in ? to_float(p[i]) : 0.0f;
      gv[k] = in ? to_float(g[i]) : 0.0f;
      bv[k] = in && reads_buffer ? to_float(buf[i]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      zenith_step(pv[k], gv[k], bv[k], c);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + k * kThreads + threadIdx.x;
      if (i < size) {
        p[i] = from_float<T>(pv[k]);
        if (c.has_buffer) {
          buf[i] = from_float<T>(bv[k]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------ launchers
template <typename T>
cudaError_t sq_norm_partials_for(const NormTensor* tensors, int64_t num_tensors, int64_t chunk_size,
                                 float* partials, cudaStream_t stream) {
  return multi_tensor_apply<NormMeta>(
      tensors, num_tensors, chunk_size, /*empty_tensors_get_a_block=*/false,
      [&](const NormMeta& meta, int blocks, int64_t first_block) {
        sq_norm_partials_kernel<T><<<blocks, kThreads, 0, stream>>>(meta, chunk_size, partials, first_block);
      });
}

template <typename T>
cudaError_t momentum_update_for(const UpdateTensor* tensors, int64_t num_tensors, int64_t chunk_size,
                                bool has_momentum, const float* hyperparams, const float* lr_scale,
                                const int64_t* step, const int32_t* step_applied, const float* grad_multiplier,
                                cudaStream_t stream) {
  // Empty tensors get a block too: their momentum step is still recorded, as in the reference.
  return multi_tensor_apply<UpdateMeta>(
      tensors, num_tensors, chunk_size, /*empty_tensors_get_a_block=*/true,
      [&](const UpdateMeta& meta, int blocks, int64_t) {
        if (has_momentum) {
          momentum_update_kernel<T, true><<<blocks, kThreads, 0, stream>>>(
              meta, chunk_size, hyperparams, lr_scale, step, step_applied, grad_multiplier);
        } else {
          momentum_update_kernel<T, false><<<blocks, kThreads, 0, stream>>>(
              meta, chunk_size, hyperparams, lr_scale, step, step_applied, grad_multiplier);
        }
      });
}

}  // namespace

int64_t count_chunks(const NormTensor* tensors, int64_t num_tensors, int64_t chunk_size) {
  int64_t count = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    count += (tensors[t].numel + chunk_size - 1) / chunk_size;
  }
  return count;
}

cudaError_t launch_sq_norm_partials(ScalarKind kind, const NormTensor* tensors, int64_t num_tensors,
                                    int64_t chunk_size, float* partials, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::Float: return sq_norm_partials_for<float>(tensors, num_tensors, chunk_size, partials, stream);
    case ScalarKind::Half: return sq_norm_partials_for<__half>(tensors, num_tensors, chunk_size, partials, stream);
    case ScalarKind::BFloat16:
      return sq_norm_partials_for<__nv_bfloat16>(tensors, num_tensors, chunk_size, partials, stream);
    case ScalarKind::Double: return sq_norm_partials_for<double>(tensors, num_tensors, chunk_size, partials, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_update_history(const float* partials, int64_t num_partials, int64_t* step,
                                  float* norm_window, int64_t window_size, float* window_max,
                                  int64_t* skipped_steps, float* grad_norm, float* lr_scale,
                                  int32_t* step_applied, float* grad_multiplier, const float* grad_scale,
                                  const float* found_inf, bool has_max_grad_norm, float max_grad_norm,
                                  cudaStream_t stream) {
  update_history_kernel<<<1, kHistoryThreads, 0, stream>>>(partials, num_partials, step, norm_window, window_size,
                                                           window_max, skipped_steps, grad_norm, lr_scale,
                                                           step_applied, grad_multiplier, grad_scale, found_inf,
                                                           has_max_grad_norm, max_grad_norm);
  return cudaGetLastError();
}

cudaError_t launch_momentum_update(ScalarKind kind, const UpdateTensor* tensors, int64_t num_tensors,
                                   int64_t chunk_size, bool has_momentum, const float* hyperparams,
                                   const float* lr_scale, const int64_t* step,
                                   const int32_t* step_applied, const float* grad_multiplier,
                                   cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::Float:
      return momentum_update_for<float>(tensors, num_tensors, chunk_size, has_momentum, hyperparams, lr_scale, step,
                                        step_applied, grad_multiplier, stream);
    case ScalarKind::Half:
      return momentum_update_for<__half>(tensors, num_tensors, chunk_size, has_momentum, hyperparams, lr_scale,
                                         step, step_applied, grad_multiplier, stream);
    case ScalarKind::BFloat16:
      return momentum_update_for<__nv_bfloat16>(tensors, num_tensors, chunk_size, has_momentum, hyperparams,
                                                lr_scale, step, step_applied, grad_multiplier, stream);
    case ScalarKind::Double:
      return momentum_update_for<double>(tensors, num_tensors, chunk_size, has_momentum, hyperparams, lr_scale,
                                         step, step_applied, grad_multiplier, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zenith_fused::cuda
