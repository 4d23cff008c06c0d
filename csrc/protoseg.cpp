// Schemas of the protoseg_ext ops, defined once; csrc/cpu and csrc/cuda only
// add implementations. Fake kernels and autograd live in protoseg_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "build_info.h"

// `import protoseg_ext._C` loads this library (and so registers the ops); the
// module itself only carries the build metadata.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "protoseg_ext compiled ops (registered as torch.ops.protoseg_ext)",
      -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "BUILD_TORCH_VERSION", PROTOSEG_BUILD_TORCH_VERSION);
  PyModule_AddStringConstant(m, "BUILD_CUDA_VERSION", PROTOSEG_BUILD_CUDA_VERSION);
  PyModule_AddStringConstant(m, "BUILD_CUDA_ARCH_LIST", PROTOSEG_BUILD_CUDA_ARCH_LIST);
  PyModule_AddIntConstant(m, "WITH_CUDA", PROTOSEG_WITH_CUDA);
  return m;
}
}

TORCH_LIBRARY(protoseg_ext, m) {
  // One pass over S = feats @ protos.view(C*K, D).T, tile by tile, keeping only
  //   seg  (N, C)  max_k S[n, c*K + k]             (if compute_seg, else (0,))
  //   argk (N, C)  uint8 arg-max k, for the backward (if compute_seg, else (0,))
  //   lse  (N,)    logsumexp_j S[n, j] / temperature (if compute_lse, else (0,))
  //   own  (N, K)  S[n, labels[n]*K + k], zero where labels[n] == ignore_index
  //                (if compute_own, else (0,)).
  // lse and own are float32 (float64 for float64 feats); seg has feats' dtype.
  m.def(
      "similarity(Tensor feats, Tensor protos, Tensor labels, int ignore_index, float temperature, "
      "bool compute_seg, bool compute_lse, bool compute_own) -> (Tensor seg, Tensor argk, Tensor lse, Tensor own)");
  // d feats = dS @ protos.view(C*K, D), dS recomputed tile by tile from the
  // saved lse (never stored); any of the three upstream gradients may be None.
  m.def(
      "similarity_backward(Tensor? grad_seg, Tensor? grad_lse, Tensor? grad_own, Tensor feats, "
      "Tensor protos, Tensor labels, Tensor argk, Tensor lse, int ignore_index, float temperature) -> Tensor");
  // Sinkhorn-Knopp of every class at once, segmented by labels; own (N, K) as
  // from `similarity`. Returns Q (N, K) (rows sum to 1; zero rows for ignored
  // or non-finite pixels).
  m.def("sinkhorn(Tensor own, Tensor labels, int num_classes, int ignore_index, int iters, float eps) -> Tensor");
  // Per-prototype feature sums (num_slots, D) and pixel counts (num_slots,) of
  // the rows with slot[n] >= 0 and finite features; deterministic.
  m.def("prototype_sums(Tensor feats, Tensor slot, int num_slots) -> (Tensor sums, Tensor counts)");
  // protos (C, K, D) -> L2-normalise(EMA(protos, normalise(sums))) where counts > 0.
  m.def("prototype_ema(Tensor protos, Tensor sums, Tensor counts, float gamma) -> Tensor");
}
