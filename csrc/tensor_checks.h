// Argument checks shared by the CPU and CUDA bindings. The fused kernels walk every tensor's
// storage linearly, so each one must be dense, and a parameter, its gradient and its momentum
// buffer must share one layout; these checks turn a violation into a RuntimeError that names the
// tensor, instead of a wrong result.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

// A tensor of `dtype` on `device` whose elements fill its storage span (contiguous,
// channels-last or any other dense permutation).
inline void check_dense(const at::Tensor& t, const char* op, const char* name, size_t index,
                        at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, "[", index, "] is on ", t.device(),
              ", expected ", device, " like the rest of the bucket");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, "[", index, "] has dtype ",
                   t.scalar_type(), ", expected ", dtype, " like the rest of the bucket");
  TORCH_CHECK(t.numel() <= 1 || t.is_non_overlapping_and_dense(), op, ": ", name, "[", index,
              "] of shape ", t.sizes(), " and strides ", t.strides(),
              " is not dense; the fused kernels need contiguous or channels-last tensors");
}

// `t` has the shape and strides of `like` (its parameter), so that element i of the storage of
// both is the same logical element.
inline void check_same_layout(const at::Tensor& t, const at::Tensor& like, const char* op,
                              const char* name, size_t index) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, "[", index, "] has shape ", t.sizes(),
              " but params[", index, "] has shape ", like.sizes());
  TORCH_CHECK(like.numel() <= 1 || t.strides() == like.strides(), op, ": ", name, "[", index,
              "] has strides ", t.strides(), " but params[", index, "] has strides ",
              like.strides(), "; the fused kernels need them equal");
}

inline void check_scalar(const at::Tensor& t, const char* op, const char* name,
                         at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == dtype && t.device() == device, op, ": ", name,
              " must be a one-element ", dtype, " tensor on ", device, "; got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
}

}  // namespace zenith_fused
