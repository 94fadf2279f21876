// Torch-free CUDA entry points of aofp_ext (design: docs/cuda-kernels.md).
//
// Every function takes the same plain parameter structs as the CPU kernels (kernels/kernels.h),
// device pointers only, a caller-owned workspace and a cudaStream_t; it enqueues its work on
// that stream and returns the first CUDA error it met (cudaSuccess otherwise). Nothing here
// allocates, synchronises, or includes torch: the ATen glue (csrc/ops/cuda) does the checks,
// the device guard, the allocation of the workspace and the error reporting.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/kernels.h"

namespace aofp {
namespace cuda {

// Memory budgets that bound the workspaces (for any K and N). The defaults suit a large GPU;
// the glue may lower them (tests do, to exercise the chunked paths on small inputs).
struct Budget {
  // Z, the per-channel contributions of one chunk of output positions: C * O * positions floats.
  int64_t z_bytes = int64_t(128) << 20;
  // per-mask state of one chunk of masks: the 0/1 matrix R and the BatchNorm (k, o) sums.
  int64_t mask_bytes = int64_t(64) << 20;
};

// masked_damage: p holds device pointers (x strided by p.g.xs; weight, bias, masks, scale,
// shift contiguous; damage (K) float32 out). K, positions, C and O must all be > 0.
size_t masked_damage_workspace_bytes(const MaskedDamageParams& p, const Budget& b);
cudaError_t masked_damage(const MaskedDamageParams& p, void* workspace, size_t workspace_bytes,
                          const Budget& b, cudaStream_t stream);

// channel_gram: gram (C, C) float32 out. positions, C and O must be > 0.
size_t channel_gram_workspace_bytes(const ChannelGramParams& p, const Budget& b);
cudaError_t channel_gram(const ChannelGramParams& p, void* workspace, size_t workspace_bytes,
                         const Budget& b, cudaStream_t stream);

// quadratic_damage: no workspace (float64 accumulation in registers). K and C must be > 0.
cudaError_t quadratic_damage(const QuadraticDamageParams& p, cudaStream_t stream);

// compact: in place on the device buffer p.data (p.keep is a device pointer), through a bounded
// temporary. first_moved = the first j with keep[j] != j (n_keep when none): the slices before
// it are already in place. temp may be any size >= 1 byte (more = fewer launches);
// compact_temp_bytes suggests one (at most max_temp_bytes).
int64_t compact_temp_bytes(const CompactParams& p, int64_t first_moved, int64_t max_temp_bytes);
cudaError_t compact(const CompactParams& p, int64_t first_moved, void* temp, int64_t temp_bytes,
                    cudaStream_t stream);

}  // namespace cuda
}  // namespace aofp
