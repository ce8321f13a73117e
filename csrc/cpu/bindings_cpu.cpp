// The CPU implementations of the zenith_fused operators (schemas in csrc/bindings.cpp): check the
// arguments (tensor_checks.h), walk the bucket's tables on the host (they are host memory),
// resolve every tensor's coefficients in one cheap loop, and hand the chunks to the harness.
// The math is in kernels_cpu.h and zenith_fused/reference.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../tensor_checks.h"
#include "multi_tensor_cpu.h"

namespace zenith_fused::cpu {
namespace {

template <typename P>
P* address(int64_t value) {
  return reinterpret_cast<P*>(static_cast<intptr_t>(value));
}

// The chunk table with each chunk's length resolved. The table's addresses are trusted (see
// tensor_checks.h), but its indices are checked: they are what decides where a kernel writes,
// and checking them on the host costs one comparison each.
std::vector<Chunk> read_chunks(const at::Tensor& tensors, const at::Tensor& chunks, int64_t chunk_size,
                               const char* op) {
  const int64_t* rows = tensors.const_data_ptr<int64_t>();
  const int64_t num_tensors = tensors.size(0);
  const int64_t* table = chunks.const_data_ptr<int64_t>();
  std::vector<Chunk> out(chunks.size(0));
  for (size_t k = 0; k < out.size(); ++k) {
    const int64_t tensor = table[k * chunk_column::kColumns + chunk_column::kTensor];
    const int64_t start = table[k * chunk_column::kColumns + chunk_column::kStart];
    TORCH_CHECK(tensor >= 0 && tensor < num_tensors, op, ": chunks[", k, "] names tensor ", tensor,
                ", which is not a row of the ", num_tensors, "-row tensor table");
    const int64_t numel = rows[tensor * tensor_column::kColumns + tensor_column::kNumel];
    TORCH_CHECK(numel >= 0 && start >= 0 && (start < numel || start == 0), op, ": chunks[", k,
                "] starts at element ", start, " of tensor ", tensor, ", which has ", numel, " elements");
    out[k] = {tensor, start, std::min(chunk_size, numel - start)};
  }
  return out;
}

void sq_norm_partials(const at::Tensor& tensors, const at::Tensor& chunks, at::ScalarType dtype,
                      int64_t chunk_size, const at::Tensor& out) {
  const TableInfo table = check_sq_norm_partials_args(tensors, chunks, dtype, chunk_size, out);
  const std::vector<Chunk> work = read_chunks(tensors, chunks, chunk_size, "zenith_fused::sq_norm_partials");
  const int64_t* rows = tensors.const_data_ptr<int64_t>();
  std::vector<const void*> grads(table.num_tensors);
  for (int64_t t = 0; t < table.num_tensors; ++t) {
    grads[t] = address<const void>(rows[t * tensor_column::kColumns + tensor_column::kGrad]);
  }
  float* partials = out.mutable_data_ptr<float>();
  const SqNormPartialsFn kernel = kernels().sq_norm_partials;
  parallel_over_chunks(work, [&](int64_t first, int64_t last) {
    kernel(table.kind, grads.data(), work.data() + first, last - first, partials + first);
  });
}

// Steps 2-3 of the reference (update_history): a handful of scalars, so plain C++. Sums run in
// double in index order and are rounded once to float (zenith_fused/layout.py: every backend's
// rule). Everything else is the reference's float32 operations, in its order.
void update_history(const at::Tensor& sq_norm_partials, at::TensorList history,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    std::optional<double> max_grad_norm) {
  const History h = check_update_history_args(sq_norm_partials, history, grad_scale, found_inf);

  const float* p = sq_norm_partials.const_data_ptr<float>();
  double sum = 0.0;
  for (int64_t i = 0; i < sq_norm_partials.numel(); ++i) {
    sum += p[i];
  }
  const float inv_scale = grad_scale.has_value() ? 1.0f / *grad_scale->const_data_ptr<float>() : 1.0f;
  const float norm = std::sqrt(static_cast<float>(sum)) * inv_scale;
  const bool finite = std::isfinite(norm) && (!found_inf.has_value() || *found_inf->const_data_ptr<float>() == 0.0f);

  int64_t& t = *h.step.mutable_data_ptr<int64_t>();
  const int64_t warmup = *h.warmup_steps.const_data_ptr<int64_t>();
  float* window = h.norm_window.mutable_data_ptr<float>();
  if (finite) {
    const int64_t new_step = next_step(t);
    if (new_step <= warmup) {
      // Linear warmup: t / K, and the window and the maximum stay empty.
      *h.lr_scale.mutable_data_ptr<float>() = static_cast<float>(new_step) / static_cast<float>(std::max<int64_t>(warmup, 1));
    } else {
      window[window_slot(t - warmup, h.window_size)] = norm;
      // Unused slots still hold 0, so the sum over the whole ring is the sum of the last min(u, W).
      double window_sum = 0.0;
      for (int64_t i = 0; i < h.window_size; ++i) {
        window_sum += window[i];
      }
      const float mean =
          static_cast<float>(window_sum) / static_cast<float>(window_count(new_step - warmup, h.window_size));
      float& maximum = *h.window_max.mutable_data_ptr<float>();
      maximum = std::max(maximum, mean);
      *h.lr_scale.mutable_data_ptr<float>() = maximum > 0.0f ? mean / maximum : 1.0f;
    }
    t = new_step;
  } else {
    *h.skipped_steps.mutable_data_ptr<int64_t>() += 1;
  }
  float multiplier = inv_scale;
  if (max_grad_norm.has_value()) {
    // The reference's max_grad_norm / (n + 1e-6) is Tensor.__rtruediv__: a reciprocal, then a
    // product. std::min keeps a NaN, as clamp does.
    const float clip = (1.0f / (norm + 1e-6f)) * static_cast<float>(*max_grad_norm);
    multiplier = multiplier * std::min(clip, 1.0f);
  }
  *h.grad_norm.mutable_data_ptr<float>() = norm;
  *h.step_applied.mutable_data_ptr<int32_t>() = finite ? 1 : 0;
  *h.grad_multiplier.mutable_data_ptr<float>() = multiplier;
}

// Resolves every tensor of the table (A: the compute type), checks every index, and only then
// records the momentum steps and runs the kernels: a call that raises has changed nothing.
template <typename A>
void update_tensors(const TableInfo& table, const at::Tensor& tensors, const at::Tensor& chunks,
                    int64_t chunk_size, bool has_momentum, const at::Tensor& hyperparams,
                    const at::Tensor& lr_ptrs, const at::Tensor& lr_scale, const at::Tensor& step,
                    const at::Tensor& step_applied, const at::Tensor& grad_multiplier) {
  constexpr const char* op = "zenith_fused::momentum_update";
  namespace col = tensor_column;
  const int64_t* rows = tensors.const_data_ptr<int64_t>();
  const A* table_rows = hyperparams.const_data_ptr<A>();
  const int64_t* lr_addresses = lr_ptrs.const_data_ptr<int64_t>();
  const int64_t groups = hyperparams.size(0);
  const A scale = static_cast<A>(*lr_scale.const_data_ptr<float>());
  const A multiplier = static_cast<A>(*grad_multiplier.const_data_ptr<float>());
  const int64_t t = *step.const_data_ptr<int64_t>();
  const bool applied = *step_applied.const_data_ptr<int32_t>() != 0;

  std::vector<UpdateTensor<A>> resolved(table.num_tensors);
  std::vector<int64_t*> steps_to_record;
  for (int64_t i = 0; i < table.num_tensors; ++i) {
    const int64_t* row = rows + i * col::kColumns;
    const int64_t slot = row[col::kHyperparamSlot];
    TORCH_CHECK(slot >= 0 && slot < groups, op, ": tensors[", i, "] has hyper-parameter slot ", slot,
                ", which is not a row of the ", groups, "-row hyperparams table");
    const A* h = table_rows + slot * hyperparam::kColumns;
    UpdateTensor<A>& u = resolved[i];
    u.param = address<void>(row[col::kParam]);
    u.grad = address<const void>(row[col::kGrad]);
    u.momentum_buffer = nullptr;
    u.grad_multiplier = multiplier;
    // lr in the compute type times the float32 scale: one rounding, as in the reference.
    u.step_lr = *address<const A>(lr_addresses[slot]) * scale;
    u.momentum = h[hyperparam::kMomentum];
    u.one_minus_dampening = h[hyperparam::kOneMinusDampening];
    u.weight_decay = h[hyperparam::kWeightDecay];
    u.sign = h[hyperparam::kMaximize] != 0 ? A(-1) : A(1);
    u.nesterov = h[hyperparam::kNesterov] != 0;
    u.first = false;
    if (has_momentum && u.momentum != 0) {
      u.momentum_buffer = address<void>(row[col::kMomentumBuffer]);
      int64_t* filled_at = address<int64_t>(row[col::kMomentumStep]);
      u.first = *filled_at == 0 || *filled_at == t;
      if (*filled_at == 0) {
        steps_to_record.push_back(filled_at);
      }
    }
  }
  const std::vector<Chunk> work = read_chunks(tensors, chunks, chunk_size, op);
  if (!applied) {
    return;  // a skipped step (non-finite norm) changes nothing
  }
  for (int64_t* filled_at : steps_to_record) {
    *filled_at = t;
  }
  const KernelSet& k = kernels();
  parallel_over_chunks(work, [&](int64_t first, int64_t last) {
    if constexpr (std::is_same_v<A, double>) {
      k.momentum_update_f64(resolved.data(), work.data() + first, last - first);
    } else {
      k.momentum_update(table.kind, resolved.data(), work.data() + first, last - first);
    }
  });
}

void momentum_update(const at::Tensor& tensors, const at::Tensor& chunks, at::ScalarType dtype,
                     int64_t chunk_size, bool has_momentum, const at::Tensor& hyperparams,
                     const at::Tensor& lr_ptrs, const at::Tensor& lr_scale, const at::Tensor& step,
                     const at::Tensor& step_applied, const at::Tensor& grad_multiplier) {
  const TableInfo table = check_momentum_update_args(tensors, chunks, dtype, chunk_size, hyperparams, lr_ptrs,
                                                     lr_scale, step, step_applied, grad_multiplier);
  if (table.kind == ScalarKind::Double) {
    update_tensors<double>(table, tensors, chunks, chunk_size, has_momentum, hyperparams, lr_ptrs, lr_scale, step,
                           step_applied, grad_multiplier);
  } else {
    update_tensors<float>(table, tensors, chunks, chunk_size, has_momentum, hyperparams, lr_ptrs, lr_scale, step,
                          step_applied, grad_multiplier);
  }
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
