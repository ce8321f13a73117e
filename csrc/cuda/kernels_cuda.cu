// The ZENITH CUDA kernels: one launch per operator call, one block per row of the bucket's chunk
// table, every tensor found through the device-side tensor table (zenith_fused/_table.py). The
// host passes only table addresses and sizes, so a launch costs the same for 1 or 2000 tensors.
//
// Arithmetic is in the compute type Acc<T> (zenith_fused.reference.compute_dtype): float for
// float, half and bfloat16 storage, double for double.
//
// sq_norm_partials (step 1 of zenith_fused/reference.py): block c writes
//     partials[c] = float32(sum over chunk c of Acc(g)^2)
// into the chunk's fixed slot; the history kernel then sums the slots in a fixed order. No
// atomics, so the norm has the same bits on every run.
// update_history (steps 2-3): n = sqrt(sum(partials)) / grad_scale; if n is finite and
// found_inf == 0: t += 1, and with K = warmup_steps: scale = t / K while t <= K (nothing
// recorded), else window[(t - 1 - K) mod W] = n, m = sum(window) / min(t - K, W), M = max(M, m),
// scale = m / M (1 when M == 0); else skipped_steps += 1. grad_multiplier = (1 / grad_scale) *
// min(1, max_grad_norm / (n + 1e-6)). One block; the host never reads any of it.
// momentum_update (step 4), per element in Acc:
//     d   = sign * (g * grad_multiplier) + weight_decay * p     (the add only when weight_decay != 0)
//     buf = d if first else momentum * buf + (1 - dampening) * d     (only when momentum != 0)
//     d   = d + momentum * buf if nesterov else buf                  (only when momentum != 0)
//     p   = p - (lr * lr_scale) * d
// with lr read through lr_ptrs, and lr_scale, step and step_applied read from device memory (a
// skipped step returns at once). Each value is rounded once, at its store, to nearest even.
//
// Products and sums use the __f*_rn / __d*_rn intrinsics: nvcc contracts a * b + c into an FMA
// by default, which would round differently from the reference's separate operations.
//
// Loads and stores are 128-bit wherever a chunk's parameter, gradient and buffer all start on a
// 16-byte boundary (the plan's usual case: fresh allocations, chunk sizes a multiple of 16
// elements); each block checks its own chunk, so one unaligned tensor (a view into a flat
// buffer) takes the scalar loop without slowing the rest of the bucket.
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
#include <type_traits>

#include "launch_cuda.h"

namespace zenith_fused::cuda {
namespace {

// 256 threads with a 64K-element chunk (CudaEngine.chunk_size): 32 iterations of 8 float32 per
// thread, enough to hide the block's start-up, and several blocks per SM to cover each other's
// tails.
constexpr int kThreads = 256;
// 16-byte packs in flight per thread and iteration: 2 for the update (3 streams), 4 for the norm
// (1 stream); about 24 KiB (update) and 16 KiB (norm) of loads in flight per block.
constexpr int kUpdatePacks = 2;
constexpr int kNormPacks = 4;
constexpr int kScalarIlp = 4;  // independent scalar loads per thread in the unaligned loops
constexpr int kHistoryThreads = 256;

// ------------------------------------------------------------------ types
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }

// Separately rounded operations (no FMA contraction).
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }

// 16 bytes of T: one 128-bit load or store.
template <typename T>
struct Pack {
  static constexpr int kSize = 16 / sizeof(T);
  uint4 raw;

  __device__ __forceinline__ T& operator[](int i) { return reinterpret_cast<T*>(&raw)[i]; }
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* src) {
  return {*reinterpret_cast<const uint4*>(src)};
}

template <typename T>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T>& pack) {
  *reinterpret_cast<uint4*>(dst) = pack.raw;
}

template <typename T>
__device__ __forceinline__ Acc<T> load_one(const T* src) {
  return to_acc(*src);
}

template <typename T>
__device__ __forceinline__ void store_one(T* dst, Acc<T> value) {
  *dst = from_acc<T>(value);
}

__device__ __forceinline__ bool is_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Element `offset` of the tensor at table address `value`. The compiler cannot tell by itself
// that an integer turned pointer is global memory, and would emit generic loads and stores for
// it; the assumption makes them global ones (LDG/STG). (nvcc 13 keeps it only when it is made
// on the final pointer, after the offset.)
template <typename P>
__device__ __forceinline__ P* address(int64_t value, int64_t offset = 0) {
  P* ptr = reinterpret_cast<P*>(static_cast<uintptr_t>(value)) + offset;
  __builtin_assume(__isGlobal(ptr));
  return ptr;
}

// One row of the chunk table, resolved through the tensor table.
struct ChunkRow {
  const int64_t* tensor;  // the tensor's row of the tensor table
  int64_t start;
  int64_t size;  // elements of this chunk, 0 for an empty tensor's chunk
};

__device__ __forceinline__ ChunkRow chunk_row(const int64_t* tensors, const int64_t* chunks, int64_t chunk_size) {
  const int64_t* row = chunks + static_cast<int64_t>(blockIdx.x) * chunk_column::kColumns;
  const int64_t* tensor = tensors + row[chunk_column::kTensor] * tensor_column::kColumns;
  const int64_t start = row[chunk_column::kStart];
  const int64_t size = max(int64_t{0}, min(chunk_size, tensor[tensor_column::kNumel] - start));
  return {tensor, start, size};
}

// ------------------------------------------------------------------ reductions
// Fixed-shape tree over the block: the same order, hence the same bits, on every run.
template <typename A, int kBlock>
__device__ A block_sum(A value, A* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int width = kBlock / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      shared[threadIdx.x] += shared[threadIdx.x + width];
    }
    __syncthreads();
  }
  const A total = shared[0];
  __syncthreads();  // `shared` may be reused at once
  return total;
}

// ------------------------------------------------------------------ squared norm
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sq_norm_partials_kernel(const int64_t* __restrict__ tensors, const int64_t* __restrict__ chunks,
                            int64_t chunk_size, float* __restrict__ partials) {
  using A = Acc<T>;
  __shared__ A shared[kThreads];
  const ChunkRow chunk = chunk_row(tensors, chunks, chunk_size);
  const T* g = address<const T>(chunk.tensor[tensor_column::kGrad], chunk.start);

  A acc = 0;
  int64_t done = 0;  // elements handled by the vector loop
  if (is_aligned(g)) {
    constexpr int kPack = Pack<T>::kSize;
    const int64_t packs = chunk.size / kPack;
    int64_t k = threadIdx.x;
    // Unmasked main loop, then the packs that do not fill a whole round.
    for (; k + (kNormPacks - 1) * kThreads < packs; k += kNormPacks * kThreads) {
      Pack<T> x[kNormPacks];
#pragma unroll
      for (int u = 0; u < kNormPacks; ++u) {
        x[u] = load_pack(g + (k + u * kThreads) * kPack);
      }
#pragma unroll
      for (int u = 0; u < kNormPacks; ++u) {
#pragma unroll
        for (int e = 0; e < kPack; ++e) {
          const A v = to_acc(x[u][e]);
          acc = add(acc, mul(v, v));
        }
      }
    }
    for (; k < packs; k += kThreads) {
      Pack<T> x = load_pack(g + k * kPack);
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        const A v = to_acc(x[e]);
        acc = add(acc, mul(v, v));
      }
    }
    done = packs * kPack;
  }
  for (int64_t base = done; base < chunk.size; base += kThreads * kScalarIlp) {
    A x[kScalarIlp];
#pragma unroll
    for (int u = 0; u < kScalarIlp; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      x[u] = i < chunk.size ? load_one(g + i) : A(0);
    }
#pragma unroll
    for (int u = 0; u < kScalarIlp; ++u) {
      acc = add(acc, mul(x[u], x[u]));
    }
  }
  const A total = block_sum<A, kThreads>(acc, shared);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = static_cast<float>(total);
  }
}

// ------------------------------------------------------------------ history
__global__ void __launch_bounds__(kHistoryThreads)
    update_history_kernel(const float* __restrict__ partials, int64_t num_partials, HistoryPointers h,
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

  const int64_t t = *h.step;
  const int64_t warmup = *h.warmup_steps;
  const int64_t slot = window_slot(t - warmup, h.window_size);
  const int64_t new_step = finite ? next_step(t) : t;
  const bool record = finite && new_step > warmup;
  // The new norm joins the window sum from a register, so no thread reads the slot after
  // thread 0 writes it. Unused slots hold 0: the sum over the ring is the last min(u, W).
  double window_acc = 0.0;
  for (int64_t i = threadIdx.x; i < h.window_size; i += kHistoryThreads) {
    window_acc += (record && i == slot) ? norm : h.norm_window[i];
  }
  const double window_sum = block_sum<double, kHistoryThreads>(window_acc, shared);

  if (threadIdx.x == 0) {
    if (record) {
      const float count = static_cast<float>(window_count(new_step - warmup, h.window_size));
      const float mean = __fdiv_rn(__double2float_rn(window_sum), count);
      const float maximum = fmaxf(*h.window_max, mean);
      h.norm_window[slot] = norm;
      *h.step = new_step;
      *h.window_max = maximum;
      *h.lr_scale = maximum > 0.0f ? __fdiv_rn(mean, maximum) : 1.0f;
    } else if (finite) {
      // Linear warmup: t / K; the window and the maximum stay empty.
      *h.step = new_step;
      *h.lr_scale = __fdiv_rn(static_cast<float>(new_step), static_cast<float>(warmup > 1 ? warmup : 1));
    } else {
      *h.skipped_steps += 1;
    }
    float multiplier = inv_scale;
    if (has_max_grad_norm) {
      // The reference's max_grad_norm / (n + 1e-6) is a reciprocal, then a product; fminf would
      // drop a NaN that clamp keeps.
      const float clip = __fmul_rn(__frcp_rn(__fadd_rn(norm, 1e-6f)), max_grad_norm);
      multiplier = __fmul_rn(multiplier, clip < 1.0f || isnan(clip) ? clip : 1.0f);
    }
    *h.grad_norm = norm;
    *h.step_applied = finite ? 1 : 0;
    *h.grad_multiplier = multiplier;
  }
}

// ------------------------------------------------------------------ momentum update
template <typename A>
struct Coefficients {
  A grad_multiplier;
  A step_lr;
  A momentum;
  A one_minus_dampening;
  A weight_decay;
  A sign;
  bool nesterov;
  bool has_buffer;
  bool first;
};

// The math of one element, apart from loads and stores.
template <typename A>
__device__ __forceinline__ void zenith_step(A& p, A g, A& buf, const Coefficients<A>& c) {
  A d = mul(mul(g, c.grad_multiplier), c.sign);  // the second multiply is exact: by +-1
  if (c.weight_decay != A(0)) {
    d = add(d, mul(c.weight_decay, p));
  }
  if (c.has_buffer) {
    buf = c.first ? d : add(mul(c.momentum, buf), mul(c.one_minus_dampening, d));
    d = c.nesterov ? add(d, mul(c.momentum, buf)) : buf;
  }
  p = sub(p, mul(c.step_lr, d));
}

// Packs first_pack, first_pack + kThreads, ... (kN of them) of one chunk: all loads first, so
// that 3 * kN 128-bit loads are in flight at once.
template <typename T, int kN>
__device__ __forceinline__ void update_packs(T* p, const T* g, T* buf, int64_t first_pack, bool reads_buffer,
                                             const Coefficients<Acc<T>>& c) {
  using A = Acc<T>;
  constexpr int kPack = Pack<T>::kSize;
  Pack<T> pv[kN], gv[kN], bv[kN];
#pragma unroll
  for (int u = 0; u < kN; ++u) {
    const int64_t at = (first_pack + u * kThreads) * kPack;
    pv[u] = load_pack(p + at);
    gv[u] = load_pack(g + at);
    bv[u] = reads_buffer ? load_pack(buf + at) : Pack<T>{};
  }
#pragma unroll
  for (int u = 0; u < kN; ++u) {
#pragma unroll
    for (int e = 0; e < kPack; ++e) {
      A pe = to_acc(pv[u][e]);
      A be = to_acc(bv[u][e]);
      zenith_step(pe, to_acc(gv[u][e]), be, c);
      pv[u][e] = from_acc<T>(pe);
      bv[u][e] = from_acc<T>(be);
    }
    const int64_t at = (first_pack + u * kThreads) * kPack;
    store_pack(p + at, pv[u]);
    if (c.has_buffer) {
      store_pack(buf + at, bv[u]);
    }
  }
}

template <typename T, bool kHasMomentum>
__global__ void __launch_bounds__(kThreads)
    momentum_update_kernel(const int64_t* __restrict__ tensors, const int64_t* __restrict__ chunks,
                           int64_t chunk_size, const Acc<T>* __restrict__ hyperparams,
                           const int64_t* __restrict__ lr_ptrs, const float* lr_scale, const int64_t* step,
                           const int32_t* step_applied, const float* grad_multiplier) {
  using A = Acc<T>;
  if (*step_applied == 0) {
    return;  // a skipped step (non-finite norm) changes nothing
  }
  const ChunkRow chunk = chunk_row(tensors, chunks, chunk_size);
  const int64_t slot = chunk.tensor[tensor_column::kHyperparamSlot];
  const A* row = hyperparams + slot * hyperparam::kColumns;

  Coefficients<A> c;
  c.grad_multiplier = static_cast<A>(*grad_multiplier);
  // lr in the compute type times the float32 scale: one rounding, as in the reference.
  c.step_lr = mul(*address<const A>(lr_ptrs[slot]), static_cast<A>(*lr_scale));
  c.momentum = row[hyperparam::kMomentum];
  c.one_minus_dampening = row[hyperparam::kOneMinusDampening];
  c.weight_decay = row[hyperparam::kWeightDecay];
  c.sign = row[hyperparam::kMaximize] != A(0) ? A(-1) : A(1);
  c.nesterov = row[hyperparam::kNesterov] != A(0);
  c.has_buffer = kHasMomentum && c.momentum != A(0);
  c.first = false;
  if (c.has_buffer) {
    // The buffer is "first" when never filled (0) or filled at this very step (by the block of
    // the tensor's first chunk, below). A block reading before or after that write sees 0 or t,
    // and both mean "first", so the blocks agree without any ordering between them.
    int64_t* filled_at = address<int64_t>(chunk.tensor[tensor_column::kMomentumStep]);
    const int64_t t = *step;
    const int64_t filled = *filled_at;
    c.first = filled == 0 || filled == t;
    __syncthreads();  // every thread of this block has read `filled` before it changes
    if (chunk.start == 0 && threadIdx.x == 0 && filled == 0) {
      *filled_at = t;
    }
  }

  T* p = address<T>(chunk.tensor[tensor_column::kParam], chunk.start);
  const T* g = address<const T>(chunk.tensor[tensor_column::kGrad], chunk.start);
  // A tensor without a buffer has its parameter's address there (never touched): no null test,
  // which would also hide from the compiler that the pointer is global.
  T* buf = address<T>(chunk.tensor[tensor_column::kMomentumBuffer], chunk.start);
  const bool reads_buffer = c.has_buffer && !c.first;

  int64_t done = 0;  // elements handled by the vector loop
  if (is_aligned(p) && is_aligned(g) && (!c.has_buffer || is_aligned(buf))) {
    constexpr int kPack = Pack<T>::kSize;
    const int64_t packs = chunk.size / kPack;
    int64_t k = threadIdx.x;
    // Whole rounds of kUpdatePacks packs per thread, unmasked, then the packs that do not fill
    // a round.
    for (; k + (kUpdatePacks - 1) * kThreads < packs; k += kUpdatePacks * kThreads) {
      update_packs<T, kUpdatePacks>(p, g, buf, k, reads_buffer, c);
    }
    for (; k < packs; k += kThreads) {
      update_packs<T, 1>(p, g, buf, k, reads_buffer, c);
    }
    done = packs * kPack;
  }
  for (int64_t base = done; base < chunk.size; base += kThreads * kScalarIlp) {
    A pv[kScalarIlp], gv[kScalarIlp], bv[kScalarIlp];
#pragma unroll
    for (int u = 0; u < kScalarIlp; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      const bool in = i < chunk.size;
      pv[u] = in ? load_one(p + i) : A(0);
      gv[u] = in ? load_one(g + i) : A(0);
      bv[u] = in && reads_buffer ? load_one(buf + i) : A(0);
    }
#pragma unroll
    for (int u = 0; u < kScalarIlp; ++u) {
      zenith_step(pv[u], gv[u], bv[u], c);
    }
#pragma unroll
    for (int u = 0; u < kScalarIlp; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      if (i < chunk.size) {
        store_one(p + i, pv[u]);
        if (c.has_buffer) {
          store_one(buf + i, bv[u]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------ launchers
template <typename T>
cudaError_t sq_norm_partials_for(const int64_t* tensors, const int64_t* chunks, int64_t num_chunks,
                                 int64_t chunk_size, float* partials, cudaStream_t stream) {
  sq_norm_partials_kernel<T><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(tensors, chunks,
                                                                                          chunk_size, partials);
  return cudaGetLastError();
}

template <typename T>
cudaError_t momentum_update_for(const int64_t* tensors, const int64_t* chunks, int64_t num_chunks,
                                int64_t chunk_size, bool has_momentum, const void* hyperparams,
                                const int64_t* lr_ptrs, const float* lr_scale, const int64_t* step,
                                const int32_t* step_applied, const float* grad_multiplier, cudaStream_t stream) {
  const auto* table = static_cast<const Acc<T>*>(hyperparams);
  const unsigned blocks = static_cast<unsigned>(num_chunks);
  if (has_momentum) {
    momentum_update_kernel<T, true><<<blocks, kThreads, 0, stream>>>(
        tensors, chunks, chunk_size, table, lr_ptrs, lr_scale, step, step_applied, grad_multiplier);
  } else {
    momentum_update_kernel<T, false><<<blocks, kThreads, 0, stream>>>(
        tensors, chunks, chunk_size, table, lr_ptrs, lr_scale, step, step_applied, grad_multiplier);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sq_norm_partials(ScalarKind kind, const int64_t* tensors, const int64_t* chunks,
                                    int64_t num_chunks, int64_t chunk_size, float* partials,
                                    cudaStream_t stream) {
  if (num_chunks == 0) {
    return cudaSuccess;
  }
  switch (kind) {
    case ScalarKind::Float:
      return sq_norm_partials_for<float>(tensors, chunks, num_chunks, chunk_size, partials, stream);
    case ScalarKind::Half:
      return sq_norm_partials_for<__half>(tensors, chunks, num_chunks, chunk_size, partials, stream);
    case ScalarKind::BFloat16:
      return sq_norm_partials_for<__nv_bfloat16>(tensors, chunks, num_chunks, chunk_size, partials, stream);
    case ScalarKind::Double:
      return sq_norm_partials_for<double>(tensors, chunks, num_chunks, chunk_size, partials, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_update_history(const float* partials, int64_t num_partials, HistoryPointers history,
                                  const float* grad_scale, const float* found_inf, bool has_max_grad_norm,
                                  float max_grad_norm, cudaStream_t stream) {
  update_history_kernel<<<1, kHistoryThreads, 0, stream>>>(partials, num_partials, history, grad_scale, found_inf,
                                                           has_max_grad_norm, max_grad_norm);
  return cudaGetLastError();
}

cudaError_t launch_momentum_update(ScalarKind kind, const int64_t* tensors, const int64_t* chunks,
                                   int64_t num_chunks, int64_t chunk_size, bool has_momentum,
                                   const void* hyperparams, const int64_t* lr_ptrs, const float* lr_scale,
                                   const int64_t* step, const int32_t* step_applied,
                                   const float* grad_multiplier, cudaStream_t stream) {
  if (num_chunks == 0) {
    return cudaSuccess;
  }
  switch (kind) {
    case ScalarKind::Float:
      return momentum_update_for<float>(tensors, chunks, num_chunks, chunk_size, has_momentum, hyperparams, lr_ptrs,
                                        lr_scale, step, step_applied, grad_multiplier, stream);
    case ScalarKind::Half:
      return momentum_update_for<__half>(tensors, chunks, num_chunks, chunk_size, has_momentum, hyperparams, lr_ptrs,
                                         lr_scale, step, step_applied, grad_multiplier, stream);
    case ScalarKind::BFloat16:
      return momentum_update_for<__nv_bfloat16>(tensors, chunks, num_chunks, chunk_size, has_momentum, hyperparams,
                                                lr_ptrs, lr_scale, step, step_applied, grad_multiplier, stream);
    case ScalarKind::Double:
      return momentum_update_for<double>(tensors, chunks, num_chunks, chunk_size, has_momentum, hyperparams, lr_ptrs,
                                         lr_scale, step, step_applied, grad_multiplier, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zenith_fused::cuda
