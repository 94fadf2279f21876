// The Python module aofp_ext._C: loading it registers the ops (csrc/registration.cpp and
// csrc/ops/*); it also tells what the build contains.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "aofp_ext compiled kernels (ops are registered under torch.ops.aofp)";
  m.def("build_info", []() {
    py::dict d;
    d["torch_version"] = AOFP_TORCH_VERSION;
#ifdef AOFP_WITH_CUDA
    d["cuda"] = true;
    d["cuda_archs"] = AOFP_CUDA_ARCHS;
#else
    d["cuda"] = false;
    d["cuda_archs"] = "";
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    return d;
  });
}
