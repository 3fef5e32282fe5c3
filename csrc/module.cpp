// Python module entry of antibody_fast._C.
//
// Every op's C++ CPU kernel lives in its own csrc/<op>.cpp and registers itself with
// TORCH_LIBRARY_FRAGMENT(antibody_fast_cpp, m), so it is reachable as torch.ops.antibody_fast_cpp.<op>.
// This file only makes the shared library importable and records the torch it was built against, so that
// the loader can refuse an extension built for another torch instead of crashing.
#include <torch/extension.h>

#ifndef ANTIBODY_FAST_TORCH_VERSION
#define ANTIBODY_FAST_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("torch_version") = ANTIBODY_FAST_TORCH_VERSION;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
