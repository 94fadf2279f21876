// Shared ATen glue of the CUDA ops: device checks, the workspace, the stream, the budgets.
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which needs the cuBLAS headers), so this
// glue also compiles, for a compile-only check, against a CPU-only torch with nvcc.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <string>

#include "kernels/cuda_kernels.h"
#include "ops/common.h"

namespace aofp {
namespace glue {
namespace cuda_glue {

inline void check_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor here, got a tensor on ",
              t.device(), "; put every input of one call on the same device");
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A byte buffer on `like`'s device from the caching allocator (stream-ordered reuse).
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// A positive byte count from the environment, or `fallback`. Tuning and test knob: the tests
// lower the budgets so that small inputs run through the chunked paths.
inline int64_t env_bytes(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && n > 0, "aofp_ext: environment variable ", name,
              " must be a positive number of bytes, got \"", v, "\"");
  return static_cast<int64_t>(n);
}

// AOFP_CUDA_Z_BYTES: workspace of Z per chunk of output positions (default 128 MiB);
// AOFP_CUDA_MASK_BYTES: per chunk of masks (default 64 MiB).
inline aofp::cuda::Budget budget() {
  aofp::cuda::Budget b;
  b.z_bytes = env_bytes("AOFP_CUDA_Z_BYTES", b.z_bytes);
  b.mask_bytes = env_bytes("AOFP_CUDA_MASK_BYTES", b.mask_bytes);
  return b;
}

// AOFP_CUDA_COMPACT_TEMP_BYTES: the bounded temporary of compact_ (default 32 MiB).
inline int64_t compact_temp_budget() {
  return env_bytes("AOFP_CUDA_COMPACT_TEMP_BYTES", int64_t(32) << 20);
}

}  // namespace cuda_glue
}  // namespace glue
}  // namespace aofp
