// The CUDA implementations of the zenith_fused operators (schemas in csrc/bindings.cpp): check
// the tensors and call the plain-CUDA launchers of kernels_cuda.cu on the current stream.
// Nothing here reads device memory on the host: every value the kernels branch on is read by
// the kernels themselves.
//
// Only c10/cuda headers (stream, guard, error check), not ATen/cuda: the latter pull in the CUDA
// math libraries' headers, which a compiler-only CUDA install may lack.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../tensor_checks.h"
#include "launch_cuda.h"

namespace zenith_fused::cuda {
namespace {

at::Tensor sq_norm_partials(at::TensorList grads, int64_t chunk_size) {
  constexpr const char* op = "zenith_fused::sq_norm_partials";
  TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive; got ", chunk_size);
  TORCH_CHECK(!grads.empty(), op, ": needs at least one gradient on the CUDA device");
  const at::Device device = grads[0].device();
  const at::ScalarType dtype = grads[0].scalar_type();
  const ScalarKind kind = scalar_kind(dtype, op);
  std::vector<NormTensor> tensors(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    check_dense(grads[i], op, "grads", i, dtype, device);
    tensors[i] = {grads[i].const_data_ptr(), grads[i].numel()};
  }
  const c10::cuda::CUDAGuard guard(device);
  const int64_t num_partials = count_chunks(tensors.data(), static_cast<int64_t>(tensors.size()), chunk_size);
  at::Tensor partials = at::empty({num_partials}, grads[0].options().dtype(at::kFloat));
  if (num_partials > 0) {
    C10_CUDA_CHECK(launch_sq_norm_partials(kind, tensors.data(), static_cast<int64_t>(tensors.size()),
                                           chunk_size, partials.mutable_data_ptr<float>(),
                                           c10::cuda::getCurrentCUDAStream().stream()));
  }
  return partials;
}

void update_history(const at::Tensor& sq_norm_partials, const at::Tensor& step,
                    const at::Tensor& norm_window, const at::Tensor& window_max,
                    const at::Tensor& skipped_steps, const at::Tensor& grad_norm,
                    const at::Tensor& lr_scale, const at::Tensor& step_applied,
                    const at::Tensor& grad_multiplier, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, std::optional<double> max_grad_norm) {
  constexpr const char* op = "zenith_fused::update_history";
  const at::Device device = norm_window.device();
  TORCH_CHECK(norm_window.dim() == 1 && norm_window.numel() >= 1 && norm_window.is_contiguous() &&
                  norm_window.scalar_type() == at::kFloat,
              op, ": norm_window must be a non-empty contiguous 1-D float32 tensor; got ",
              norm_window.scalar_type(), " of shape ", norm_window.sizes());
  TORCH_CHECK(sq_norm_partials.dim() == 1 && sq_norm_partials.scalar_type() == at::kFloat &&
                  sq_norm_partials.device() == device,
              op, ": sq_norm_partials must be a 1-D float32 tensor on ", device, "; got ",
              sq_norm_partials.scalar_type(), " of shape ", sq_norm_partials.sizes(), " on ",
              sq_norm_partials.device());
  check_scalar(step, op, "step", at::kLong, device);
  check_scalar(window_max, op, "window_max", at::kFloat, device);
  check_scalar(skipped_steps, op, "skipped_steps", at::kLong, device);
  check_scalar(grad_norm, op, "grad_norm", at::kFloat, device);
  check_scalar(lr_scale, op, "lr_scale", at::kFloat, device);
  check_scalar(step_applied, op, "step_applied", at::kInt, device);
  check_scalar(grad_multiplier, op, "grad_multiplier", at::kFloat, device);
  if (grad_scale.has_value()) {
    check_scalar(*grad_scale, op, "grad_scale", at::kFloat, device);
  }
  if (found_inf.has_value()) {
    check_scalar(*found_inf, op, "found_inf", at::kFloat, device);
  }

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor partials = sq_norm_partials.contiguous();
  C10_CUDA_CHECK(launch_update_history(
      partials.const_data_ptr<float>(), partials.numel(), step.mutable_data_ptr<int64_t>(),
      norm_window.mutable_data_ptr<float>(), norm_window.numel(), window_max.mutable_data_ptr<float>(),
      skipped_steps.mutable_data_ptr<int64_t>(), grad_norm.mutable_data_ptr<float>(),
      lr_scale.mutable_data_ptr<float>(), step_applied.mutable_data_ptr<int32_t>(),
      grad_multiplier.mutable_data_ptr<float>(),
      grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr,
      found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr, max_grad_norm.has_value(),
      static_cast<float>(max_grad_norm.value_or(0.0)), c10::cuda::getCurrentCUDAStream().stream()));
}

void momentum_update(at::TensorList params, at::TensorList grads,
                     const c10::List<std::optional<at::Tensor>>& momentum_buffers,
                     const c10::List<std::optional<at::Tensor>>& momentum_steps,
                     const at::Tensor& hyperparams, at::IntArrayRef hyperparam_slots,
                     const at::Tensor& lr_scale, const at::Tensor& step,
                     const at::Tensor& step_applied, const at::Tensor& grad_multiplier,
                     int64_t chunk_size) {
  constexpr const char* op = "zenith_fused::momentum_update";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && momentum_buffers.size() == n && momentum_steps.size() == n &&
                  hyperparam_slots.size() == n,
              op, ": params, grads, momentum_buffers, momentum_steps and hyperparam_slots must have "
              "one entry per tensor; got ", n, ", ", grads.size(), ", ", momentum_buffers.size(), ", ",
              momentum_steps.size(), " and ", hyperparam_slots.size());
  TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive; got ", chunk_size);
  if (n == 0) {
    return;
  }
  const at::Device device = params[0].device();
  TORCH_CHECK(hyperparams.dim() == 2 && hyperparams.size(1) == hyperparam::kColumns &&
                  hyperparams.scalar_type() == at::kFloat && hyperparams.device() == device &&
                  hyperparams.is_contiguous(),
              op, ": hyperparams must be a contiguous float32 tensor of shape [groups, ",
              hyperparam::kColumns, "] on ", device, "; got ", hyperparams.scalar_type(), " of shape ",
              hyperparams.sizes(), " on ", hyperparams.device());
  check_scalar(lr_scale, op, "lr_scale", at::kFloat, device);
  check_scalar(step, op, "step", at::kLong, device);
  check_scalar(step_applied, op, "step_applied", at::kInt, device);
  check_scalar(grad_multiplier, op, "grad_multiplier", at::kFloat, device);

  const at::ScalarType dtype = params[0].scalar_type();
  const ScalarKind kind = scalar_kind(dtype, op);
  const int64_t groups = hyperparams.size(0);
  std::vector<UpdateTensor> tensors(n);
  bool has_momentum = false;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_dense(p, op, "params", i, dtype, device);
    check_dense(grads[i], op, "grads", i, dtype, device);
    check_same_layout(grads[i], p, op, "grads", i);
    const int64_t slot = hyperparam_slots[i];
    TORCH_CHECK(slot >= 0 && slot < groups, op, ": hyperparam_slots[", i, "] = ", slot,
                " is not a row of the ", groups, "-row hyperparams table");
    UpdateTensor& u = tensors[i];
    u = {p.mutable_data_ptr(), grads[i].const_data_ptr(), nullptr, nullptr, p.numel(),
         static_cast<int32_t>(slot)};
    // Whether the group has momentum is in the (device) table; the host only knows whether a
    // buffer was passed. The kernel uses a buffer only where its row's momentum != 0.
    const std::optional<at::Tensor> buf = momentum_buffers.get(i);
    const std::optional<at::Tensor> buf_step = momentum_steps.get(i);
    TORCH_CHECK(buf.has_value() == buf_step.has_value(), op, ": params[", i,
                "] has a momentum buffer without a momentum step, or the reverse");
    if (buf.has_value()) {
      check_dense(*buf, op, "momentum_buffers", i, dtype, device);
      check_same_layout(*buf, p, op, "momentum_buffers", i);
      TORCH_CHECK(buf_step->numel() == 1 && buf_step->scalar_type() == at::kLong &&
                      buf_step->device() == device,
                  op, ": momentum_steps[", i, "] must be a one-element int64 tensor on ", device,
                  "; got ", buf_step->scalar_type(), " of shape ", buf_step->sizes(), " on ",
                  buf_step->device());
      u.momentum_buffer = buf->mutable_data_ptr();
      u.momentum_step = buf_step->mutable_data_ptr<int64_t>();
      has_momentum = true;
    }
  }

  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(launch_momentum_update(kind, tensors.data(), static_cast<int64_t>(n), chunk_size, has_momentum,
                                        hyperparams.const_data_ptr<float>(), lr_scale.const_data_ptr<float>(),
                                        step.const_data_ptr<int64_t>(), step_applied.const_data_ptr<int32_t>(),
                                        grad_multiplier.const_data_ptr<float>(),
                                        c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace zenith_fused::cuda

TORCH_LIBRARY_IMPL(zenith_fused, CUDA, m) {
  m.impl("sq_norm_partials", &zenith_fused::cuda::sq_norm_partials);
  m.impl("update_history", &zenith_fused::cuda::update_history);
  m.impl("momentum_update", &zenith_fused::cuda::momentum_update);
}
