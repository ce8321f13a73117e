// The CPU implementations of the zenith_fused operators (schemas in csrc/bindings.cpp): check
// the tensors, resolve per-tensor state on the host, and hand the chunk tables to the harness.
// The math is in kernels_cpu.h and zenith_fused/reference.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "../tensor_checks.h"
#include "multi_tensor_cpu.h"

namespace zenith_fused::cpu {
namespace {

const at::Device kCpu(at::kCPU);

at::Tensor sq_norm_partials(at::TensorList grads, int64_t chunk_size) {
  constexpr const char* op = "zenith_fused::sq_norm_partials";
  TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive; got ", chunk_size);
  if (grads.empty()) {
    return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  }
  const at::ScalarType dtype = grads[0].scalar_type();
  const ScalarKind kind = scalar_kind(dtype, op);
  std::vector<const void*> data(grads.size());
  std::vector<int64_t> numels(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    check_dense(grads[i], op, "grads", i, dtype, kCpu);
    data[i] = grads[i].const_data_ptr();
    numels[i] = grads[i].numel();
  }
  const std::vector<Chunk> chunks = split_into_chunks(numels, chunk_size);
  at::Tensor partials = at::empty({static_cast<int64_t>(chunks.size())}, at::TensorOptions().dtype(at::kFloat));
  float* out = partials.mutable_data_ptr<float>();
  const SqNormPartialsFn kernel = kernels().sq_norm_partials;
  parallel_over_chunks(chunks, [&](int64_t first, int64_t last) {
    kernel(kind, data.data(), chunks.data() + first, last - first, out + first);
  });
  return partials;
}

// Steps 1-3 of the reference (update_history): a handful of scalars, so plain C++. Sums run in
// double in index order: deterministic, and closer to the exact sum than either float order.
// Everything else is the reference's float32 operations, in its order.
void update_history(const at::Tensor& sq_norm_partials, const at::Tensor& step,
                    const at::Tensor& norm_window, const at::Tensor& window_max,
                    const at::Tensor& skipped_steps, const at::Tensor& grad_norm,
                    const at::Tensor& lr_scale, const at::Tensor& step_applied,
                    const at::Tensor& grad_multiplier, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, std::optional<double> max_grad_norm) {
  constexpr const char* op = "zenith_fused::update_history";
  TORCH_CHECK(sq_norm_partials.dim() == 1 && sq_norm_partials.scalar_type() == at::kFloat &&
                  sq_norm_partials.device() == kCpu,
              op, ": sq_norm_partials must be a 1-D float32 CPU tensor; got ", sq_norm_partials.scalar_type(),
              " of shape ", sq_norm_partials.sizes(), " on ", sq_norm_partials.device());
  TORCH_CHECK(norm_window.dim() == 1 && norm_window.numel() >= 1 && norm_window.is_contiguous() &&
                  norm_window.scalar_type() == at::kFloat && norm_window.device() == kCpu,
              op, ": norm_window must be a non-empty contiguous 1-D float32 CPU tensor; got ",
              norm_window.scalar_type(), " of shape ", norm_window.sizes());
  check_scalar(step, op, "step", at::kLong, kCpu);
  check_scalar(window_max, op, "window_max", at::kFloat, kCpu);
  check_scalar(skipped_steps, op, "skipped_steps", at::kLong, kCpu);
  check_scalar(grad_norm, op, "grad_norm", at::kFloat, kCpu);
  check_scalar(lr_scale, op, "lr_scale", at::kFloat, kCpu);
  check_scalar(step_applied, op, "step_applied", at::kInt, kCpu);
  check_scalar(grad_multiplier, op, "grad_multiplier", at::kFloat, kCpu);
  if (grad_scale.has_value()) {
    check_scalar(*grad_scale, op, "grad_scale", at::kFloat, kCpu);
  }
  if (found_inf.has_value()) {
    check_scalar(*found_inf, op, "found_inf", at::kFloat, kCpu);
  }

  const at::Tensor partials = sq_norm_partials.contiguous();
  const float* p = partials.const_data_ptr<float>();
  double sum = 0.0;
  for (int64_t i = 0; i < partials.numel(); ++i) {
    sum += p[i];
  }
  const float inv_scale = grad_scale.has_value() ? 1.0f / *grad_scale->const_data_ptr<float>() : 1.0f;
  const float norm = std::sqrt(static_cast<float>(sum)) * inv_scale;
  const bool finite = std::isfinite(norm) && (!found_inf.has_value() || *found_inf->const_data_ptr<float>() == 0.0f);

  int64_t& t = *step.mutable_data_ptr<int64_t>();
  float* window = norm_window.mutable_data_ptr<float>();
  const int64_t window_size = norm_window.numel();
  if (finite) {
    window[t % window_size] = norm;
    t += 1;
    // Unused slots still hold 0, so the sum over the whole ring is the sum of the last min(t, W).
    double window_sum = 0.0;
    for (int64_t i = 0; i < window_size; ++i) {
      window_sum += window[i];
    }
    const float mean = static_cast<float>(window_sum) / static_cast<float>(std::min(t, window_size));
    float& maximum = *window_max.mutable_data_ptr<float>();
    maximum = std::max(maximum, mean);
    *lr_scale.mutable_data_ptr<float>() = maximum > 0.0f ? mean / maximum : 1.0f;
  } else {
    *skipped_steps.mutable_data_ptr<int64_t>() += 1;
  }
  float multiplier = inv_scale;
  if (max_grad_norm.has_value()) {
    // The reference's max_grad_norm / (n + 1e-6) is Tensor.__rtruediv__: a reciprocal, then a
    // product. std::min keeps a NaN, as clamp does.
    const float clip = (1.0f / (norm + 1e-6f)) * static_cast<float>(*max_grad_norm);
    multiplier = multiplier * std::min(clip, 1.0f);
  }
  *grad_norm.mutable_data_ptr<float>() = norm;
  *step_applied.mutable_data_ptr<int32_t>() = finite ? 1 : 0;
  *grad_multiplier.mutable_data_ptr<float>() = multiplier;
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
  TORCH_CHECK(hyperparams.dim() == 2 && hyperparams.size(1) == hyperparam::kColumns &&
                  hyperparams.scalar_type() == at::kFloat && hyperparams.device() == kCpu &&
                  hyperparams.is_contiguous(),
              op, ": hyperparams must be a contiguous float32 CPU tensor of shape [groups, ",
              hyperparam::kColumns, "]; got ", hyperparams.scalar_type(), " of shape ", hyperparams.sizes());
  check_scalar(lr_scale, op, "lr_scale", at::kFloat, kCpu);
  check_scalar(step, op, "step", at::kLong, kCpu);
  check_scalar(step_applied, op, "step_applied", at::kInt, kCpu);
  check_scalar(grad_multiplier, op, "grad_multiplier", at::kFloat, kCpu);
  TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive; got ", chunk_size);
  if (n == 0) {
    return;
  }

  const at::ScalarType dtype = params[0].scalar_type();
  const ScalarKind kind = scalar_kind(dtype, op);
  const float* table = hyperparams.const_data_ptr<float>();
  const int64_t groups = hyperparams.size(0);
  const float scale = *lr_scale.const_data_ptr<float>();
  const int64_t t = *step.const_data_ptr<int64_t>();
  const bool applied = *step_applied.const_data_ptr<int32_t>() != 0;
  const float multiplier = *grad_multiplier.const_data_ptr<float>();

  // Check everything before writing anything, so a call that raises has changed nothing.
  std::vector<UpdateTensor> tensors(n);
  std::vector<int64_t> numels(n);
  std::vector<int64_t*> steps_to_record;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_dense(p, op, "params", i, dtype, kCpu);
    check_dense(grads[i], op, "grads", i, dtype, kCpu);
    check_same_layout(grads[i], p, op, "grads", i);
    const int64_t slot = hyperparam_slots[i];
    TORCH_CHECK(slot >= 0 && slot < groups, op, ": hyperparam_slots[", i, "] = ", slot,
                " is not a row of the ", groups, "-row hyperparams table");
    const float* row = table + slot * hyperparam::kColumns;

    UpdateTensor& u = tensors[i];
    u.param = p.mutable_data_ptr();
    u.grad = grads[i].const_data_ptr();
    u.momentum_buffer = nullptr;
    u.grad_multiplier = multiplier;
    // The reference multiplies float32(lr) by the float32 scale: one float32 rounding.
    u.step_lr = row[hyperparam::kLr] * scale;
    u.momentum = row[hyperparam::kMomentum];
    u.one_minus_dampening = row[hyperparam::kOneMinusDampening];
    u.weight_decay = row[hyperparam::kWeightDecay];
    u.sign = row[hyperparam::kMaximize] != 0.0f ? -1.0f : 1.0f;
    u.nesterov = row[hyperparam::kNesterov] != 0.0f;
    u.first = false;
    numels[i] = p.numel();

    if (u.momentum != 0.0f) {
      const std::optional<at::Tensor> buf = momentum_buffers.get(i);
      const std::optional<at::Tensor> buf_step = momentum_steps.get(i);
      TORCH_CHECK(buf.has_value() && buf_step.has_value(), op, ": params[", i,
                  "] belongs to a group with momentum but has no momentum buffer or momentum step");
      check_dense(*buf, op, "momentum_buffers", i, dtype, kCpu);
      check_same_layout(*buf, p, op, "momentum_buffers", i);
      TORCH_CHECK(buf_step->numel() == 1 && buf_step->scalar_type() == at::kLong &&
                      buf_step->device() == kCpu,
                  op, ": momentum_steps[", i, "] must be a one-element int64 CPU tensor; got ",
                  buf_step->scalar_type(), " of shape ", buf_step->sizes(), " on ", buf_step->device());
      u.momentum_buffer = buf->mutable_data_ptr();
      int64_t* filled_at = buf_step->mutable_data_ptr<int64_t>();
      u.first = *filled_at == 0 || *filled_at == t;
      if (*filled_at == 0) {
        steps_to_record.push_back(filled_at);
      }
    }
  }
  if (!applied) {
    return;  // a skipped step (non-finite norm) changes nothing
  }
  for (int64_t* filled_at : steps_to_record) {
    *filled_at = t;
  }

  const std::vector<Chunk> chunks = split_into_chunks(numels, chunk_size);
  const MomentumUpdateFn kernel = kernels().momentum_update;
  parallel_over_chunks(chunks, [&](int64_t first, int64_t last) {
    kernel(kind, tensors.data(), chunks.data() + first, last - first);
  });
}

std::string cpu_kernel_isa() {
  return kernels().isa;
}

}  // namespace
}  // namespace zenith_fused::cpu

TORCH_LIBRARY_IMPL(zenith_fused, CPU, m) {
  m.impl("sq_norm_partials", &zenith_fused::cpu::sq_norm_partials);
  m.impl("update_history", &zenith_fused::cpu::update_history);
  m.impl("momentum_update", &zenith_fused::cpu::momentum_update);
}

TORCH_LIBRARY_FRAGMENT(zenith_fused, m) {
  // Which build of the CPU kernels runs here (DEFAULT, AVX2 or AVX512): for tests and reports.
  m.def("cpu_kernel_isa() -> str", &zenith_fused::cpu::cpu_kernel_isa);
}
