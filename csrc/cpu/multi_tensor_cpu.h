// The CPU multi-tensor harness: the plain per-call tables one fused kernel walks, and the
// interface between the harness (multi_tensor_cpu.cpp, which splits the work and runs it on
// ATen's intra-op threads), the bindings (bindings_cpu.cpp, which fill the tables from the
// tensor table of zenith_fused/_table.py) and the kernels (kernels_cpu.h, compiled once per
// instruction set).
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

// One row of the chunk table, with its length resolved: the unit of work of a thread and the
// slot of one squared-norm partial, so the partials do not depend on how many threads run.
struct Chunk {
  int64_t tensor;  // row of the tensor table
  int64_t begin;   // first element, counted in storage order
  int64_t size;    // 0 for the one chunk of an empty tensor
};

// One tensor of a momentum update, resolved on the host before the parallel loop, with its
// group's hyper-parameters in the compute type Acc (float, or double for float64 tensors).
template <typename Acc>
struct UpdateTensor {
  void* param;
  const void* grad;
  void* momentum_buffer;  // null when the group's momentum is 0
  Acc grad_multiplier;    // unscaling and clipping, from the history (1 without either)
  Acc step_lr;            // lr * lr_scale: one product in Acc, as in the reference
  Acc momentum;
  Acc one_minus_dampening;
  Acc weight_decay;
  Acc sign;  // -1 when maximizing, else 1
  bool nesterov;
  bool first;  // momentum_step was 0 (never filled) or equals this step
};

// partials[i] = sum of g^2 over chunks[i], for i < num_chunks; grads[t] is tensor t's gradient.
using SqNormPartialsFn = void (*)(ScalarKind kind, const void* const* grads, const Chunk* chunks,
                                  int64_t num_chunks, float* partials);
// Steps every element of chunks[0, num_chunks) of `tensors`: float32 arithmetic for Float, Half
// and BFloat16 tensors (MomentumUpdateFn), float64 for Double ones (MomentumUpdateF64Fn).
using MomentumUpdateFn = void (*)(ScalarKind kind, const UpdateTensor<float>* tensors, const Chunk* chunks,
                                  int64_t num_chunks);
using MomentumUpdateF64Fn = void (*)(const UpdateTensor<double>* tensors, const Chunk* chunks,
                                     int64_t num_chunks);

struct KernelSet {
  const char* isa;  // "DEFAULT", "AVX2" or "AVX512" as torch.backends.cpu names them, or "AVX512_BF16"
  SqNormPartialsFn sq_norm_partials;
  MomentumUpdateFn momentum_update;
  MomentumUpdateF64Fn momentum_update_f64;
};

// One per build of kernels_cpu.h; a build this compiler cannot make has null function pointers.
KernelSet default_kernels();
KernelSet avx2_kernels();
KernelSet avx512_kernels();
KernelSet avx512_bf16_kernels();  // null also where the processor lacks AVX512_BF16

// The best build this processor runs, following ATen's own choice (at::get_cpu_capability(),
// which honours ATEN_CPU_CAPABILITY=default|avx2|avx512): AVX512_BF16 where ATen chose AVX512 by
// itself and the processor has it, else the build named like ATen's.
const KernelSet& kernels();

// Calls body(first, last) on disjoint, contiguous ranges of chunks that together cover all of
// them, in parallel on ATen's intra-op threads when there is enough work. Ranges are balanced by
// element count (plus a per-chunk overhead), not by chunk count, because chunks of small tensors
// are short.
void parallel_over_chunks(const std::vector<Chunk>& chunks,
                          const std::function<void(int64_t, int64_t)>& body);

}  // namespace zenith_fused::cpu
