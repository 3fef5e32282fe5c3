// Python module entry of antibody_fast._C.
//
// Every op's C++ CPU kernel lives in its own csrc/<op>.cpp and registers itself in one style: the schema with
// m.def(...) in TORCH_LIBRARY_FRAGMENT(antibody_fast_cpp, m), the kernel with m.impl(...) in
// TORCH_LIBRARY_IMPL(antibody_fast_cpp, CPU, m), so it is reachable as torch.ops.antibody_fast_cpp.<op>.
// This file only makes the shared library importable and records the torch it was built against, so that
// the loader can refuse an extension built for another torch instead of crashing.
#include <torch/extension.h>

// ANTIBODY_FAST_TORCH_VERSION is passed unquoted (e.g. -DANTIBODY_FAST_TORCH_VERSION=2.13.0+cpu): quotes do
// not survive every build path (setup.py's ninja file vs torch.utils.cpp_extension.load), stringizing does.
#define ANTIBODY_FAST_STR_(x) #x
#define ANTIBODY_FAST_STR(x) ANTIBODY_FAST_STR_(x)
#ifdef ANTIBODY_FAST_TORCH_VERSION
#define ANTIBODY_FAST_TORCH_VERSION_STR ANTIBODY_FAST_STR(ANTIBODY_FAST_TORCH_VERSION)
#else
#define ANTIBODY_FAST_TORCH_VERSION_STR "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("torch_version") = ANTIBODY_FAST_TORCH_VERSION_STR;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
