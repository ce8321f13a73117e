// The zenith_fused operator library: schemas here, implementations per device in
// cpu/bindings_cpu.cpp and cuda/bindings_cuda.cpp, fake (meta) implementations for torch.compile
// in zenith_fused/_ext.py. Python reaches the operators as torch.ops.zenith_fused.<name>.
//
// The three operators are the three engine methods of zenith_fused/_engines.py, and each does
// for a whole (device, dtype) bucket what zenith_fused/reference.py does tensor by tensor:
//
//   sq_norm_partials    step 1: one float32 squared-norm partial per chunk of chunk_size
//                       elements of every gradient, in tensor order (empty tensors have none)
//   update_history      steps 2-3: fold the partials into the history, in place, on its device;
//                       grad_scale / found_inf are GradScaler's (float32, or None), max_grad_norm
//                       turns clipping on; sets grad_multiplier (reference.StepInputs)
//   momentum_update     step 4: SGD's momentum update of g * grad_multiplier at lr * lr_scale, a
//                       no-op unless step_applied; hyperparams is the float32 [groups, 6] table of
//                       _engines.hyperparam_rows and hyperparam_slots picks each tensor's row
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(zenith_fused, m) {
  m.def("sq_norm_partials(Tensor[] grads, int chunk_size) -> Tensor");
  m.def(
      "update_history(Tensor sq_norm_partials, Tensor(a!) step, Tensor(b!) norm_window, "
      "Tensor(c!) window_max, Tensor(d!) skipped_steps, Tensor(e!) grad_norm, Tensor(f!) lr_scale, "
      "Tensor(g!) step_applied, Tensor(h!) grad_multiplier, Tensor? grad_scale, Tensor? found_inf, "
      "float? max_grad_norm) -> ()");
  m.def(
      "momentum_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)?[] momentum_buffers, "
      "Tensor(c!)?[] momentum_steps, Tensor hyperparams, int[] hyperparam_slots, Tensor lr_scale, "
      "Tensor step, Tensor step_applied, Tensor grad_multiplier, int chunk_size) -> ()");
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
