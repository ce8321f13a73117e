// The CPU multi-tensor harness: the plain tables one call of a fused kernel walks, and the
// interface between the harness (multi_tensor_cpu.cpp, which splits the work and runs it on
// ATen's intra-op threads) and the kernels (kernels_cpu.h, compiled once per instruction set).
//
// Only plain types here: the kernel files include this header before they switch instruction
// set, and nothing in it may be compiled for AVX2 or AVX512.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "../common.h"

// The AVX2 and AVX512 builds of the kernels need GCC's target pragma (see isa_prelude.h). Other
// compilers and processors get the baseline build, which is correct everywhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ZENITH_FUSED_X86_ISA_BUILDS 1
#else
#define ZENITH_FUSED_X86_ISA_BUILDS 0
#endif

namespace zenith_fused::cpu {

// Every tensor is cut into chunks of a fixed number of elements (the last one shorter). A chunk
// is the unit of work of a thread and the slot of one squared-norm partial, so the partials do
// not depend on how many threads run.
struct Chunk {
  int64_t tensor;  // index into the call's tensor list
  int64_t begin;   // first element, counted in storage order
  int64_t size;
};

std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numels, int64_t chunk_size);

// One tensor of a momentum update, resolved on the host before the parallel loop: the
// hyper-parameters of its group as float32 (as the reference rounds them) and whether its
// momentum buffer is filled with d at this step.
struct UpdateTensor {
  void* param;
  const void* grad;
  void* momentum_buffer;  // null when the group's momentum is 0
  float grad_multiplier;  // unscaling and clipping, from the history (1 without either)
  float step_lr;          // lr * lr_scale, one float32 product as in the reference
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  float sign;  // -1 when maximizing, else 1
  bool nesterov;
  bool first;  // momentum_step was 0 (never filled) or equals this step
};

// partials[i] = sum of float(g)^2 over chunks[i], for i < num_chunks.
using SqNormPartialsFn = void (*)(ScalarKind kind, const void* const* grads, const Chunk* chunks,
                                  int64_t num_chunks, float* partials);
// Steps every element of chunks[0, num_chunks) of `tensors`.
using MomentumUpdateFn = void (*)(ScalarKind kind, const UpdateTensor* tensors, const Chunk* chunks,
                                  int64_t num_chunks);

struct KernelSet {
  const char* isa;  // "DEFAULT", "AVX2" or "AVX512", as torch.backends.cpu names them
  SqNormPartialsFn sq_norm_partials;
  MomentumUpdateFn momentum_update;
};

// One per build of kernels_cpu.h; a build this compiler cannot make has null function pointers.
KernelSet default_kernels();
KernelSet avx2_kernels();
KernelSet avx512_kernels();

// The best build this processor runs, following ATen's own choice (at::get_cpu_capability(),
// which honours ATEN_CPU_CAPABILITY=default|avx2|avx512).
const KernelSet& kernels();

// Calls body(first, last) on disjoint, contiguous ranges of chunks that together cover all of
// them, in parallel on ATen's intra-op threads when there is enough work. Ranges are balanced by
// element count (plus a per-chunk overhead), not by chunk count, because chunks of small tensors
// are short.
void parallel_over_chunks(const std::vector<Chunk>& chunks,
                          const std::function<void(int64_t, int64_t)>& body);

}  // namespace zenith_fused::cpu
