// Argument checks shared by the CPU and CUDA bindings: one routine per operator, so that both
// devices accept and refuse exactly the same calls with the same messages. Each routine looks only
// at shapes, dtypes and devices (never at tensor values), so it costs the same on either device
// and reads no device memory. Every check runs before the operator writes anything: a call that
// raises has changed nothing.
//
// The raw addresses inside a tensor table are trusted: the step plan that builds the table keeps
// the tensors alive and rebuilds it when any of them moves (zenith_fused/_table.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common.h"

namespace zenith_fused {

inline ScalarKind scalar_kind(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kFloat: return ScalarKind::Float;
    case at::kHalf: return ScalarKind::Half;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kDouble: return ScalarKind::Double;
    default:
      TORCH_CHECK_TYPE(false, op, ": the fused kernels support float32, float16, bfloat16 and "
                       "float64 tensors; got ", dtype, ". Use backend='reference' for other dtypes");
  }
}

// zenith_fused.reference.compute_dtype.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// One element of `dtype` on `device`, any shape ([], [1], [1, 1], ...).
inline void check_scalar(const at::Tensor& t, const char* op, const char* name,
                         at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == dtype && t.device() == device, op, ": ", name,
              " must be a one-element ", dtype, " tensor on ", device, "; got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
}

// A contiguous int64 table of `columns` columns on `device`.
inline void check_index_table(const at::Tensor& t, const char* op, const char* name, int64_t columns,
                              const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == columns && t.scalar_type() == at::kLong &&
                  t.is_contiguous() && t.device() == device,
              op, ": ", name, " must be a contiguous int64 tensor of shape [rows, ", columns,
              "] on ", device, "; got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

// What both operators that walk a tensor table know after checking it.
struct TableInfo {
  at::Device device;
  ScalarKind kind;
  int64_t num_tensors;
  int64_t num_chunks;
};

inline TableInfo check_table(const at::Tensor& tensors, const at::Tensor& chunks, at::ScalarType dtype,
                             int64_t chunk_size, const char* op) {
  const at::Device device = tensors.device();
  check_index_table(tensors, op, "tensors", tensor_column::kColumns, device);
  check_index_table(chunks, op, "chunks", chunk_column::kColumns, device);
  TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive; got ", chunk_size);
  return {device, scalar_kind(dtype, op), tensors.size(0), chunks.size(0)};
}

// sq_norm_partials(tensors, chunks, dtype, chunk_size, out).
inline TableInfo check_sq_norm_partials_args(const at::Tensor& tensors, const at::Tensor& chunks,
                                             at::ScalarType dtype, int64_t chunk_size, const at::Tensor& out) {
  constexpr const char* op = "zenith_fused::sq_norm_partials";
  const TableInfo table = check_table(tensors, chunks, dtype, chunk_size, op);
  TORCH_CHECK(out.dim() == 1 && out.size(0) == table.num_chunks && out.scalar_type() == at::kFloat &&
                  out.is_contiguous() && out.device() == table.device,
              op, ": out must be a contiguous float32 tensor of shape [", table.num_chunks,
              "] (one partial per chunk) on ", table.device, "; got ", out.scalar_type(), " of shape ",
              out.sizes(), " on ", out.device());
  return table;
}

// momentum_update(tensors, chunks, dtype, chunk_size, has_momentum, hyperparams, lr_ptrs,
// lr_scale, step, step_applied, grad_multiplier). The history scalars live with the bucket.
inline TableInfo check_momentum_update_args(const at::Tensor& tensors, const at::Tensor& chunks,
                                            at::ScalarType dtype, int64_t chunk_size,
                                            const at::Tensor& hyperparams, const at::Tensor& lr_ptrs,
                                            const at::Tensor& lr_scale, const at::Tensor& step,
                                            const at::Tensor& step_applied, const at::Tensor& grad_multiplier) {
  constexpr const char* op = "zenith_fused::momentum_update";
  const TableInfo table = check_table(tensors, chunks, dtype, chunk_size, op);
  const at::ScalarType compute = compute_dtype(dtype);
  TORCH_CHECK(hyperparams.dim() == 2 && hyperparams.size(1) == hyperparam::kColumns &&
                  hyperparams.scalar_type() == compute && hyperparams.is_contiguous() &&
                  hyperparams.device() == table.device,
              op, ": hyperparams must be a contiguous ", compute, " tensor (the compute dtype of ", dtype,
              ") of shape [groups, ", hyperparam::kColumns, "] on ", table.device, "; got ",
              hyperparams.scalar_type(), " of shape ", hyperparams.sizes(), " on ", hyperparams.device());
  TORCH_CHECK(lr_ptrs.dim() == 1 && lr_ptrs.size(0) == hyperparams.size(0) && lr_ptrs.scalar_type() == at::kLong &&
                  lr_ptrs.is_contiguous() && lr_ptrs.device() == table.device,
              op, ": lr_ptrs must be a contiguous int64 tensor of shape [", hyperparams.size(0),
              "] (one address per hyperparams row) on ", table.device, "; got ", lr_ptrs.scalar_type(),
              " of shape ", lr_ptrs.sizes(), " on ", lr_ptrs.device());
  check_scalar(lr_scale, op, "lr_scale", at::kFloat, table.device);
  check_scalar(step, op, "step", at::kLong, table.device);
  check_scalar(step_applied, op, "step_applied", at::kInt, table.device);
  check_scalar(grad_multiplier, op, "grad_multiplier", at::kFloat, table.device);
  return table;
}

// The history list of update_history, unpacked by name (history_field order).
struct History {
  at::Device device;
  int64_t window_size;
  const at::Tensor& step;
  const at::Tensor& norm_window;
  const at::Tensor& window_max;
  const at::Tensor& skipped_steps;
  const at::Tensor& grad_norm;
  const at::Tensor& lr_scale;
  const at::Tensor& step_applied;
  const at::Tensor& grad_multiplier;
  const at::Tensor& warmup_steps;
};

// update_history(sq_norm_partials, history, grad_scale, found_inf, max_grad_norm): everything on
// the device of the history's norm_window.
inline History check_update_history_args(const at::Tensor& sq_norm_partials, at::TensorList history,
                                         const std::optional<at::Tensor>& grad_scale,
                                         const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "zenith_fused::update_history";
  namespace f = history_field;
  TORCH_CHECK(history.size() == f::kCount, op, ": history must hold the ", f::kCount,
              " tensors of zenith_fused.layout.HISTORY_FIELDS, in that order; got ", history.size());
  const at::Tensor& window = history[f::kNormWindow];
  const at::Device device = window.device();
  TORCH_CHECK(window.dim() == 1 && window.numel() >= 1 && window.is_contiguous() &&
                  window.scalar_type() == at::kFloat,
              op, ": norm_window must be a non-empty contiguous 1-D float32 tensor; got ",
              window.scalar_type(), " of shape ", window.sizes());
  check_scalar(history[f::kStep], op, "step", at::kLong, device);
  check_scalar(history[f::kWindowMax], op, "window_max", at::kFloat, device);
  check_scalar(history[f::kSkippedSteps], op, "skipped_steps", at::kLong, device);
  check_scalar(history[f::kGradNorm], op, "grad_norm", at::kFloat, device);
  check_scalar(history[f::kLrScale], op, "lr_scale", at::kFloat, device);
  check_scalar(history[f::kStepApplied], op, "step_applied", at::kInt, device);
  check_scalar(history[f::kGradMultiplier], op, "grad_multiplier", at::kFloat, device);
  check_scalar(history[f::kWarmupSteps], op, "warmup_steps", at::kLong, device);
  TORCH_CHECK(sq_norm_partials.dim() == 1 && sq_norm_partials.scalar_type() == at::kFloat &&
                  sq_norm_partials.is_contiguous() && sq_norm_partials.device() == device,
              op, ": sq_norm_partials must be a contiguous 1-D float32 tensor on ", device,
              " (the history's device); got ", sq_norm_partials.scalar_type(), " of shape ",
              sq_norm_partials.sizes(), " on ", sq_norm_partials.device());
  if (grad_scale.has_value()) {
    check_scalar(*grad_scale, op, "grad_scale", at::kFloat, device);
  }
  if (found_inf.has_value()) {
    check_scalar(*found_inf, op, "found_inf", at::kFloat, device);
  }
  return {device,
          window.numel(),
          history[f::kStep],
          window,
          history[f::kWindowMax],
          history[f::kSkippedSteps],
          history[f::kGradNorm],
          history[f::kLrScale],
          history[f::kStepApplied],
          history[f::kGradMultiplier],
          history[f::kWarmupSteps]};
}

}  // namespace zenith_fused
