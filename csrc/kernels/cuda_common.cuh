// Shared pieces of the CUDA kernels (torch-free): error propagation, small device helpers,
// the position-chunk plan, a workspace carver, and the launchers that several ops share
// (defined in zconv_cuda.cu and gram_cuda.cu).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels/cuda_kernels.h"

// Return the first CUDA error from a host function that returns cudaError_t.
#define AOFP_CUDA_TRY(expr)                     \
  do {                                          \
    const cudaError_t aofp_err_ = (expr);       \
    if (aofp_err_ != cudaSuccess) return aofp_err_; \
  } while (0)

namespace aofp {
namespace cuda {
namespace detail {

constexpr int kThreads = 256;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// relu that propagates NaN (fmaxf would turn NaN into 0).
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Blocks for a grid-stride loop over n items (at least 1, at most max_blocks).
inline unsigned grid_for(int64_t n, int threads = kThreads, int64_t max_blocks = 65535 * 8) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, threads), max_blocks)));
}

// Streaming multiprocessors of the current device (for sizing persistent grids).
inline int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    n = 132;  // cannot happen on a valid device; the launch check reports the error
  }
  return n;
}

// Output positions (flattened over n, ho, wo) processed per chunk, so that Z of one chunk,
// C * O * ldp floats, stays within the budget. ldp (row length of Z) is a multiple of 4.
struct PosChunks {
  int64_t P = 0;    // all positions
  int64_t Pc = 0;   // positions per chunk (the last one may be shorter)
  int64_t ldp = 0;  // round_up(Pc, 4)
  int64_t n = 0;    // number of chunks
  int64_t count(int64_t i) const { return std::min(Pc, P - i * Pc); }
};

inline PosChunks plan_positions(int64_t P, int64_t C, int64_t O, int64_t budget_bytes) {
  PosChunks pc;
  pc.P = P;
  const int64_t per_pos = std::max<int64_t>(1, C * O) * int64_t(sizeof(float));
  const int64_t fit = std::max<int64_t>(1, budget_bytes / per_pos);
  if (round_up(P, 4) <= fit) {
    pc.Pc = P;
  } else if (fit >= 128) {
    pc.Pc = fit / 128 * 128;  // whole 128-position GEMM tiles
  } else {
    pc.Pc = std::max<int64_t>(4, fit / 4 * 4);
  }
  pc.Pc = std::min(pc.Pc, P);
  pc.ldp = round_up(pc.Pc, 4);
  pc.n = ceil_div(P, pc.Pc);
  return pc;
}

// Carves one workspace into 256-byte aligned pieces; run once with base == nullptr to size it.
struct Carver {
  char* base = nullptr;
  size_t off = 0;
  template <typename T>
  T* take(int64_t count) {
    off = (off + 255) / 256 * 256;
    T* p = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += size_t(std::max<int64_t>(count, 0)) * sizeof(T);
    return p;
  }
};

// ---- shared launchers ------------------------------------------------------------------------

// Z of the output positions [q0, q0 + np): z[(c * O + o) * ldp + p] = conv(x[:, c], W[o, c]) at
// position q0 + p, minus zsub[c * O + o] (if given), times zmul[o] (if given); exactly 0 for
// np <= p < ldp.
cudaError_t launch_z(const ConvGeom& g, const float* x, const float* w, int64_t q0, int64_t np,
                     int64_t ldp, const float* zsub, const float* zmul, float* z,
                     cudaStream_t stream);

// In place: z[(c * O + o) * ldp + p] -= zsub[c * O + o] for p < np (the padding stays 0).
// Gives bit for bit what launch_z with the same zsub writes.
cudaError_t launch_center(float* z, int64_t C, int64_t O, int64_t np, int64_t ldp,
                          const float* zsub, cudaStream_t stream);

// yb[o * ldp + p] = ymul[o] * (sum_c z[(c * O + o) * ldp + p] + bias[o]) + yadd[o] (one rounding
// for the last multiply-add; missing pointers mean 1 / 0 / 0); 0 for np <= p < ldp.
cudaError_t launch_ysum(const float* z, int64_t C, int64_t O, int64_t np, int64_t ldp,
                        const float* bias, const float* ymul, const float* yadd, float* yb,
                        cudaStream_t stream);

// For each of R rows of m (leading dimension ld): sum[r] += sum of its first n entries,
// sq[r] += sum of their squares (sq may be null). float64 accumulation, deterministic.
cudaError_t launch_row_sums(const float* m, int64_t R, int64_t n, int64_t ld, double* sum,
                            double* sq, cudaStream_t stream);

// gd (C x C, row-major) += zm zm^T on the lower triangle (diagonal included), zm being C rows of
// L floats. float32 partial sums over at most 512 columns, accumulated in float64.
cudaError_t launch_syrk(const float* zm, int64_t C, int64_t L, double* gd, cudaStream_t stream);

// gd[i][j] = gd[j][i] for i < j (mirror the lower triangle).
cudaError_t launch_symmetrize(double* gd, int64_t C, cudaStream_t stream);

// out[i][j] = float(gd[max(i, j)][min(i, j)]).
cudaError_t launch_gram_to_float(const double* gd, int64_t C, float* out, cudaStream_t stream);

// damage[k] = sum_{c, c'} r_kc G[c][c'] r_kc' with r = 1 - masks (masks: (K, C) bytes, nonzero =
// keep); float64 accumulation, deterministic.
cudaError_t launch_quadratic(const float* gram, int64_t C, const uint8_t* masks, int64_t K,
                             float* damage, cudaStream_t stream);
cudaError_t launch_quadratic(const double* gram, int64_t C, const uint8_t* masks, int64_t K,
                             float* damage, cudaStream_t stream);

}  // namespace detail
}  // namespace cuda
}  // namespace aofp
