// Device-agnostic glue of compact_: checks, the memory-order view of each tensor, the in-place
// resize. The backend supplies `run`, which compacts one buffer described by CompactParams
// (params.keep points to host memory for the CPU kernel and to device memory for CUDA).
#pragma once

#include <ATen/ATen.h>

#include <functional>

#include "kernels/kernels.h"

namespace aofp {
namespace glue {

// run(params, keep_on_device): compact one dense buffer in place; keep_on_device is `keep` on
// the tensor's device (int64, contiguous), so a backend can take params.keep from it.
using CompactRun = std::function<void(CompactParams&, const at::Tensor& keep_on_device)>;
// shrink(storage, nbytes): reallocate a storage that only the compacted tensor uses to its new
// size (frees the cut channels' memory); nullptr keeps the old allocation.
using StorageShrink = std::function<void(c10::StorageImpl*, size_t)>;

void compact_impl(at::TensorList tensors, at::IntArrayRef dims, const at::Tensor& keep,
                  const CompactRun& run, const StorageShrink& shrink);

}  // namespace glue
}  // namespace aofp
