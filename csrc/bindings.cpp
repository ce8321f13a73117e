// The zenith_fused operator library: schemas here, implementations per device in
// cpu/bindings_cpu.cpp and cuda/bindings_cuda.cpp, argument checks shared by both in
// tensor_checks.h. Python reaches the operators as torch.ops.zenith_fused.<name>.
//
// Each operator does for a whole (device, dtype) bucket what zenith_fused/reference.py does tensor
// by tensor, walking the bucket's tables (zenith_fused/_table.py: `tensors` int64 [N, 6] and
// `chunks` int64 [C, 2], on the bucket's device). The CUDA implementation is one kernel launch
// per call, whatever N and C are.
//
//   sq_norm_partials    step 1: out[c] = sum over chunk c of g^2, accumulated in float32
//                       (float64 for float64 gradients), stored as float32
//   update_history      steps 2-3: fold the partials into the history (one list, in
//                       reference.HISTORY_FIELDS order), in place, on its device; grad_scale /
//                       found_inf are GradScaler's (float32, or None), max_grad_norm turns
//                       clipping on; sets grad_multiplier (reference.StepInputs)
//   momentum_update     step 4: SGD's momentum update of g * grad_multiplier at lr * lr_scale in
//                       the compute dtype of `dtype`, a no-op unless step_applied. hyperparams is
//                       the [groups, 6] table in that compute dtype; lr_ptrs[g] is the address of
//                       group g's lr (a scalar of the compute dtype), the only lr the kernels read.
//
// The tables hold raw addresses, so momentum_update writes parameters, momentum buffers and
// momentum steps that the schema cannot name; callers that trace it (torch.compile) wrap it in
// an operator of their own that declares them.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(zenith_fused, m) {
  m.def("sq_norm_partials(Tensor tensors, Tensor chunks, ScalarType dtype, int chunk_size, Tensor(a!) out) -> ()");
  m.def(
      "update_history(Tensor sq_norm_partials, Tensor(a!)[] history, Tensor? grad_scale, Tensor? found_inf, "
      "float? max_grad_norm) -> ()");
  m.def(
      "momentum_update(Tensor tensors, Tensor chunks, ScalarType dtype, int chunk_size, bool has_momentum, "
      "Tensor hyperparams, Tensor lr_ptrs, Tensor lr_scale, Tensor step, Tensor step_applied, "
      "Tensor grad_multiplier) -> ()");
}

// `import zenith_fused._C` loads this library, whose static initializers register the operators;
// the module itself is empty.
#define ZENITH_FUSED_CONCAT_(a, b) a##b
#define ZENITH_FUSED_CONCAT(a, b) ZENITH_FUSED_CONCAT_(a, b)
#define ZENITH_FUSED_STRINGIFY_(a) #a
#define ZENITH_FUSED_STRINGIFY(a) ZENITH_FUSED_STRINGIFY_(a)

PyMODINIT_FUNC ZENITH_FUSED_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, ZENITH_FUSED_STRINGIFY(TORCH_EXTENSION_NAME),
                               "Compiled kernels of zenith_fused (operators in torch.ops.zenith_fused)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
