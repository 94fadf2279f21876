// In-place channel compaction of one dense device buffer (CUDA).
//
// The buffer is (outer, size, inner); slice (a, j) of the result, j < n_keep, comes from slice
// (a, keep[j]). Number the destination elements e = (a * n_keep + j) * inner + w in memory order;
// the source of e is src(e) = (a * size + keep[j]) * inner + w, and src(e) >= e (keep[j] >= j and
// n_keep <= size), with src increasing in e.
//
// Overlap scheme: the destination range is processed in chunks [D0, D0 + len) in increasing order,
// each in two stream-ordered steps through a bounded temporary:
//   1. gather: temp[t] = buf[src(D0 + t)]   (reads only)
//   2. copy:   buf[D0 .. D0 + len) = temp   (writes only, after step 1 finished)
// Step 1 of a chunk reads src(e) >= e >= D0, which no earlier chunk wrote (they wrote below D0);
// step 2 writes below D0 + len, and every later chunk reads at or above D0 + len. So every
// source element is read before anything overwrites it, whatever the gaps in keep, and there is
// never a second copy of more than one chunk. Destination elements before the first slice that
// moves (keep[j] == j for j < first_moved, in the first outer block) are already in place and
// skipped.
#include "kernels/cuda_common.cuh"

namespace aofp {
namespace cuda {

namespace {

template <typename T>
__global__ void gather_kernel(const T* buf, T* temp, int64_t D0, int64_t len,
                              int64_t slice_units, int64_t n_keep, int64_t size,
                              const int64_t* keep) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < len;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = D0 + t;
    const int64_t i = e / slice_units;          // destination slice (a * n_keep + j)
    const int64_t w = e - i * slice_units;
    const int64_t a = i / n_keep;
    const int64_t j = i - a * n_keep;
    temp[t] = buf[(a * size + __ldg(keep + j)) * slice_units + w];
  }
}

template <typename T>
cudaError_t run(const CompactParams& p, int64_t first_moved, void* temp, int64_t temp_bytes,
                cudaStream_t stream) {
  const int64_t unit = int64_t(sizeof(T));
  const int64_t slice_units = p.inner * p.elem_size / unit;
  const int64_t end = p.outer * p.n_keep * slice_units;
  const int64_t chunk = temp_bytes / unit;
  if (chunk <= 0) return cudaErrorInvalidValue;
  T* buf = static_cast<T*>(p.data);
  T* tmp = static_cast<T*>(temp);
  for (int64_t D0 = first_moved * slice_units; D0 < end; D0 += chunk) {
    const int64_t len = std::min(chunk, end - D0);
    gather_kernel<T><<<detail::grid_for(len), detail::kThreads, 0, stream>>>(
        buf, tmp, D0, len, slice_units, p.n_keep, p.size, p.keep);
    AOFP_CUDA_TRY(cudaGetLastError());
    AOFP_CUDA_TRY(cudaMemcpyAsync(buf + D0, tmp, size_t(len) * sizeof(T),
                                  cudaMemcpyDeviceToDevice, stream));
  }
  return cudaSuccess;
}

int64_t moved_bytes(const CompactParams& p, int64_t first_moved) {
  const int64_t slice = p.inner * p.elem_size;
  return std::max<int64_t>(0, (p.outer * p.n_keep - first_moved) * slice);
}

}  // namespace

int64_t compact_temp_bytes(const CompactParams& p, int64_t first_moved, int64_t max_temp_bytes) {
  if (p.n_keep <= 0 || p.outer <= 0 || p.inner <= 0) return 0;
  const int64_t slice = p.inner * p.elem_size;
  // at least one 16-byte unit, so that any slice size can be processed
  return std::min(moved_bytes(p, first_moved), std::max<int64_t>(max_temp_bytes, std::min<int64_t>(slice, 16)));
}

cudaError_t compact(const CompactParams& p, int64_t first_moved, void* temp, int64_t temp_bytes,
                    cudaStream_t stream) {
  if (p.n_keep <= 0 || p.outer <= 0 || p.inner <= 0 || p.elem_size <= 0) return cudaSuccess;
  if (first_moved < 0 || first_moved > p.n_keep) return cudaErrorInvalidValue;
  if (moved_bytes(p, first_moved) == 0) return cudaSuccess;
  // The widest unit that divides the slice and both addresses.
  const int64_t slice = p.inner * p.elem_size;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p.data) | reinterpret_cast<uintptr_t>(temp);
  auto fits = [&](int64_t u) { return slice % u == 0 && addr % uintptr_t(u) == 0 && temp_bytes >= u; };
  if (fits(16)) return run<uint4>(p, first_moved, temp, temp_bytes, stream);
  if (fits(8)) return run<uint2>(p, first_moved, temp, temp_bytes, stream);
  if (fits(4)) return run<uint32_t>(p, first_moved, temp, temp_bytes, stream);
  if (fits(2)) return run<uint16_t>(p, first_moved, temp, temp_bytes, stream);
  return run<uint8_t>(p, first_moved, temp, temp_bytes, stream);
}

}  // namespace cuda
}  // namespace aofp
