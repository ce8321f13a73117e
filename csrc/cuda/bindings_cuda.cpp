// The CUDA implementations of the zenith_fused operators (schemas in csrc/bindings.cpp): check
// the arguments (tensor_checks.h, shared with the CPU bindings) and make exactly one launch of a
// plain-CUDA kernel of kernels_cuda.cu, on the current stream of the tensors' device. Nothing
// here reads device memory on the host: the kernels read the tables and every value they branch
// on themselves.
//
// Only c10/cuda headers (stream, guard, error check), not ATen/cuda: the latter pull in the CUDA
// math libraries' headers, which a compiler-only CUDA install may lack.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../tensor_checks.h"
#include "launch_cuda.h"

namespace zenith_fused::cuda {
namespace {

void sq_norm_partials(const at::Tensor& tensors, const at::Tensor& chunks, at::ScalarType dtype,
                      int64_t chunk_size, const at::Tensor& out) {
  const TableInfo table = check_sq_norm_partials_args(tensors, chunks, dtype, chunk_size, out);
  const c10::cuda::CUDAGuard guard(table.device);
  C10_CUDA_CHECK(launch_sq_norm_partials(table.kind, tensors.const_data_ptr<int64_t>(),
                                         chunks.const_data_ptr<int64_t>(), table.num_chunks, chunk_size,
                                         out.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
}

void update_history(const at::Tensor& sq_norm_partials, at::TensorList history,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    std::optional<double> max_grad_norm) {
  const History h = check_update_history_args(sq_norm_partials, history, grad_scale, found_inf);
  const c10::cuda::CUDAGuard guard(h.device);
  const HistoryPointers pointers{
      h.step.mutable_data_ptr<int64_t>(),       h.norm_window.mutable_data_ptr<float>(),
      h.window_size,                            h.window_max.mutable_data_ptr<float>(),
      h.skipped_steps.mutable_data_ptr<int64_t>(), h.grad_norm.mutable_data_ptr<float>(),
      h.lr_scale.mutable_data_ptr<float>(),     h.step_applied.mutable_data_ptr<int32_t>(),
      h.grad_multiplier.mutable_data_ptr<float>(), h.warmup_steps.const_data_ptr<int64_t>(),
  };
  C10_CUDA_CHECK(launch_update_history(
      sq_norm_partials.const_data_ptr<float>(), sq_norm_partials.numel(), pointers,
      grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr,
      found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr, max_grad_norm.has_value(),
      static_cast<float>(max_grad_norm.value_or(0.0)), c10::cuda::getCurrentCUDAStream().stream()));
}

void momentum_update(const at::Tensor& tensors, const at::Tensor& chunks, at::ScalarType dtype,
                     int64_t chunk_size, bool has_momentum, const at::Tensor& hyperparams,
                     const at::Tensor& lr_ptrs, const at::Tensor& lr_scale, const at::Tensor& step,
                     const at::Tensor& step_applied, const at::Tensor& grad_multiplier) {
  const TableInfo table = check_momentum_update_args(tensors, chunks, dtype, chunk_size, hyperparams, lr_ptrs,
                                                     lr_scale, step, step_applied, grad_multiplier);
  const c10::cuda::CUDAGuard guard(table.device);
  C10_CUDA_CHECK(launch_momentum_update(
      table.kind, tensors.const_data_ptr<int64_t>(), chunks.const_data_ptr<int64_t>(), table.num_chunks, chunk_size,
      has_momentum, hyperparams.const_data_ptr(), lr_ptrs.const_data_ptr<int64_t>(),
      lr_scale.const_data_ptr<float>(), step.const_data_ptr<int64_t>(), step_applied.const_data_ptr<int32_t>(),
      grad_multiplier.const_data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace zenith_fused::cuda

TORCH_LIBRARY_IMPL(zenith_fused, CUDA, m) {
  m.impl("sq_norm_partials", &zenith_fused::cuda::sq_norm_partials);
  m.impl("update_history", &zenith_fused::cuda::update_history);
  m.impl("momentum_update", &zenith_fused::cuda::momentum_update);
}
