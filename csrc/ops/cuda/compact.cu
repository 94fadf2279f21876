// compact_: CUDA glue. The device-agnostic part (checks, memory-order view, re-pointing the same
// TensorImpl, freeing the cut memory) is glue::compact_impl (ops/compact.cpp); this file gives it
// the CUDA kernel (kernels/compact_cuda.cu: in place through a bounded temporary) and the CUDA
// storage shrink.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/compact.h"
#include "ops/cuda/cuda_glue.h"

// From ATen/native/cuda/Resize.h (libtorch_cuda), declared here because that header does not
// compile under nvcc's front end.
namespace at {
namespace native {
void resize_bytes_cuda(c10::StorageImpl* storage, size_t size_bytes);
}  // namespace native
}  // namespace at

namespace aofp {
namespace glue {
namespace {

void compact_cuda(at::TensorList tensors, at::IntArrayRef dims, const at::Tensor& keep) {
  const char* op = "compact_";
  c10::optional<c10::Device> dev;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].defined() && tensors[i].is_cuda()) {
      dev = tensors[i].device();
      break;
    }
  }
  if (!dev.has_value()) {
    // Only `keep` is on the GPU: the tensors are on the CPU (or there are none). Hand the call
    // to the CPU kernel with keep on the CPU.
    static const auto cpu_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("aofp::compact_", "")
            .typed<void(at::TensorList, at::IntArrayRef, const at::Tensor&)>();
    cpu_op.call(tensors, dims, keep.to(at::kCPU));
    return;
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!tensors[i].defined() || tensors[i].device() == *dev, op, ": tensors[", i,
                "] is on ", tensors[i].device(), " but tensors of this call are on ", *dev,
                "; compact the tensors of each device in a separate call");
  }
  const c10::cuda::CUDAGuard guard(*dev);
  const int64_t temp_budget = cuda_glue::compact_temp_budget();
  at::Tensor keep_host;  // filled on first use, after compact_impl has checked keep
  compact_impl(
      tensors, dims, keep,
      [&](CompactParams& p, const at::Tensor& keep_dev) {
        if (!keep_host.defined()) keep_host = keep.to(at::kCPU).contiguous();
        const int64_t* kh = keep_host.data_ptr<int64_t>();
        int64_t first_moved = 0;
        while (first_moved < p.n_keep && kh[first_moved] == first_moved) ++first_moved;
        const int64_t tb = aofp::cuda::compact_temp_bytes(p, first_moved, temp_budget);
        if (tb <= 0) return;
        at::Tensor temp = cuda_glue::workspace(size_t(tb), keep_dev);
        C10_CUDA_CHECK(aofp::cuda::compact(p, first_moved, temp.data_ptr(), tb,
                                           cuda_glue::current_stream()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      [](c10::StorageImpl* s, size_t nbytes) { at::native::resize_bytes_cuda(s, nbytes); });
}

}  // namespace
}  // namespace glue
}  // namespace aofp

TORCH_LIBRARY_IMPL(aofp, CUDA, m) { m.impl("compact_", &aofp::glue::compact_cuda); }
