// The Python module aofp_ext._C: loading it registers the ops (csrc/registration.cpp and
// csrc/ops/*); it also tells what the build contains.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "aofp_ext compiled kernels (ops are registered under torch.ops.aofp)";
  m.def("build_info", []() {
    py::dict d;
    d["torch_version"] = AOFP_TORCH_VERSION;
    d["cxx_standard"] = AOFP_CXX_STANDARD;
#ifdef AOFP_WITH_CUDA
    d["cuda"] = true;
    d["cuda_archs"] = AOFP_CUDA_ARCHS;  // CMake style: "90-real,90-virtual" = sm_90 SASS + compute_90 PTX
    d["nvcc_version"] = AOFP_NVCC_VERSION;
#else
    d["cuda"] = false;
    d["cuda_archs"] = "";
    d["nvcc_version"] = "";
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    return d;
  });
}
