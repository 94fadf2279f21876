// channel_gram and quadratic_damage on CUDA, and the Gram / quadratic-form kernels that the
// linear path of masked_damage shares.
//
// channel_gram: per chunk of output positions, Z (C rows of O * ldp floats, scaled by scale[o])
// comes from zconv_cuda.cu; a tiled SYRK adds Z Z^T into a float64 C x C buffer (lower
// triangle): float32 partial sums over segments of 512 columns, then float64 atomics. The result
// is mirrored and rounded to float32 once.
//
// quadratic_damage: damage[k] = r_k^T G r_k, r = 1 - mask, with float64 accumulation; a block
// prices 8 masks at once so each row of G is read once per 8 masks.
#include "kernels/cuda_common.cuh"

namespace aofp {
namespace cuda {
namespace detail {

namespace {

constexpr int64_t kSeg = 512;  // columns per float32 partial sum

// Lower-triangle tile pair p -> (ti, tj), ti >= tj.
__device__ __forceinline__ void tile_pair(int64_t p, int64_t& ti, int64_t& tj) {
  int64_t t = int64_t((sqrt(8.0 * double(p) + 1.0) - 1.0) * 0.5);
  while (t * (t + 1) / 2 > p) --t;
  while ((t + 1) * (t + 2) / 2 <= p) ++t;
  ti = t;
  tj = p - t * (t + 1) / 2;
}

// T x T output tile per block (T = 32 or 64), 256 threads of (T/16) x (T/16) outputs each.
template <int T>
__global__ void __launch_bounds__(kThreads) syrk_kernel(const float* zm, int64_t C, int64_t L,
                                                        double* gd) {
  constexpr int BL = 16, R = T / 16;
  __shared__ float xa[BL][T + 1];
  __shared__ float xb[BL][T + 1];
  int64_t ti, tj;
  tile_pair(blockIdx.x, ti, tj);
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t nseg = ceil_div(L, kSeg);
  for (int64_t seg = blockIdx.y; seg < nseg; seg += gridDim.y) {
    const int64_t l_begin = seg * kSeg;
    const int64_t l_end = min(L, l_begin + kSeg);
    float acc[R][R];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int s = 0; s < R; ++s) acc[r][s] = 0.f;
    for (int64_t l0 = l_begin; l0 < l_end; l0 += BL) {
#pragma unroll
      for (int e = 0; e < R; ++e) {
        const int idx = tid + e * kThreads;  // < T * BL
        const int l = idx & (BL - 1), c = idx / BL;
        const int64_t gl = l0 + l;
        const int64_t ca = ti * T + c, cb = tj * T + c;
        xa[l][c] = (ca < C && gl < l_end) ? __ldg(zm + ca * L + gl) : 0.f;
        xb[l][c] = (cb < C && gl < l_end) ? __ldg(zm + cb * L + gl) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int l = 0; l < BL; ++l) {
        float av[R], bv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) av[r] = xa[l][ty + 16 * r];
#pragma unroll
        for (int s = 0; s < R; ++s) bv[s] = xb[l][tx + 16 * s];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int s = 0; s < R; ++s) acc[r][s] = __fmaf_rn(av[r], bv[s], acc[r][s]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int s = 0; s < R; ++s) {
        const int64_t ci = ti * T + ty + 16 * r, cj = tj * T + tx + 16 * s;
        if (ci < C && cj < C && ci >= cj) atomicAdd(gd + ci * C + cj, double(acc[r][s]));
      }
    }
  }
}

__global__ void symmetrize_kernel(double* gd, int64_t C) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < C * C;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / C, j = idx - i * C;
    if (i < j) gd[idx] = gd[j * C + i];
  }
}

__global__ void gram_to_float_kernel(const double* gd, int64_t C, float* out) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < C * C;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / C, j = idx - i * C;
    out[idx] = float(i >= j ? gd[idx] : gd[j * C + i]);
  }
}

constexpr int kMasksPerBlock = 8;
constexpr int64_t kMaxSmemChannels = 32768;  // bytes of per-channel mask bits in shared memory

// Bits kb (0..7) of the masks k0 + kb that remove channel c.
__device__ __forceinline__ unsigned drop_bits(const uint8_t* masks, int64_t C, int64_t k0, int nk,
                                              int64_t c) {
  unsigned b = 0;
  for (int kb = 0; kb < nk; ++kb)
    if (__ldg(masks + (k0 + kb) * C + c) == 0) b |= 1u << kb;
  return b;
}

template <typename GT, bool SMEM>
__global__ void __launch_bounds__(kThreads) quadratic_kernel(const GT* gram, int64_t C,
                                                             const uint8_t* masks, int64_t K,
                                                             float* damage) {
  extern __shared__ uint8_t colbits[];  // (C) when SMEM
  __shared__ double red[kMasksPerBlock][kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t kg = blockIdx.x; kg * kMasksPerBlock < K; kg += gridDim.x) {
    const int64_t k0 = kg * kMasksPerBlock;
    const int nk = int(min(int64_t(kMasksPerBlock), K - k0));
    if (SMEM) {
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
        colbits[c] = uint8_t(drop_bits(masks, C, k0, nk, c));
      __syncthreads();
    }
    double acc[kMasksPerBlock];
#pragma unroll
    for (int kb = 0; kb < kMasksPerBlock; ++kb) acc[kb] = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const unsigned rb = SMEM ? unsigned(colbits[c]) : drop_bits(masks, C, k0, nk, c);
      if (rb == 0) continue;  // same value in every thread: uniform branch
      const GT* row = gram + c * C;
      for (int64_t c2 = threadIdx.x; c2 < C; c2 += blockDim.x) {
        const unsigned b =
            rb & (SMEM ? unsigned(colbits[c2]) : drop_bits(masks, C, k0, nk, c2));
        if (b == 0) continue;
        const double gv = double(row[c2]);
#pragma unroll
        for (int kb = 0; kb < kMasksPerBlock; ++kb)
          if (b & (1u << kb)) acc[kb] += gv;
      }
    }
#pragma unroll
    for (int kb = 0; kb < kMasksPerBlock; ++kb) {
      const double v = warp_sum(acc[kb]);
      if (lane == 0) red[kb][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < nk) {
      double s = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) s += red[threadIdx.x][w];
      damage[k0 + threadIdx.x] = float(s);
    }
    __syncthreads();  // red and colbits are reused by the next group
  }
}

template <typename GT>
cudaError_t quadratic_impl(const GT* gram, int64_t C, const uint8_t* masks, int64_t K,
                           float* damage, cudaStream_t stream) {
  if (K <= 0) return cudaSuccess;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(K, kMasksPerBlock), 65535));
  if (C <= kMaxSmemChannels) {
    quadratic_kernel<GT, true><<<blocks, kThreads, size_t(C), stream>>>(gram, C, masks, K, damage);
  } else {
    quadratic_kernel<GT, false><<<blocks, kThreads, 0, stream>>>(gram, C, masks, K, damage);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_syrk(const float* zm, int64_t C, int64_t L, double* gd, cudaStream_t stream) {
  if (C <= 0 || L <= 0) return cudaSuccess;
  const int64_t nseg = ceil_div(L, kSeg);
  if (C <= 32) {
    const dim3 grid(1, unsigned(std::min<int64_t>(nseg, 65535)));
    syrk_kernel<32><<<grid, kThreads, 0, stream>>>(zm, C, L, gd);
  } else {
    const int64_t nt = ceil_div(C, 64);
    const int64_t pairs = nt * (nt + 1) / 2;
    // Enough blocks to fill the device, few enough that the float64 atomics stay cheap.
    const int64_t want = std::max<int64_t>(1, int64_t(sm_count()) * 8 / pairs);
    const dim3 grid(unsigned(pairs), unsigned(std::min<int64_t>({nseg, want, 65535})));
    syrk_kernel<64><<<grid, kThreads, 0, stream>>>(zm, C, L, gd);
  }
  return cudaGetLastError();
}

cudaError_t launch_symmetrize(double* gd, int64_t C, cudaStream_t stream) {
  symmetrize_kernel<<<grid_for(C * C), kThreads, 0, stream>>>(gd, C);
  return cudaGetLastError();
}

cudaError_t launch_gram_to_float(const double* gd, int64_t C, float* out, cudaStream_t stream) {
  gram_to_float_kernel<<<grid_for(C * C), kThreads, 0, stream>>>(gd, C, out);
  return cudaGetLastError();
}

cudaError_t launch_quadratic(const float* gram, int64_t C, const uint8_t* masks, int64_t K,
                             float* damage, cudaStream_t stream) {
  return quadratic_impl(gram, C, masks, K, damage, stream);
}

cudaError_t launch_quadratic(const double* gram, int64_t C, const uint8_t* masks, int64_t K,
                             float* damage, cudaStream_t stream) {
  return quadratic_impl(gram, C, masks, K, damage, stream);
}

}  // namespace detail

// ---- entry points ----------------------------------------------------------------------------

namespace {

struct GramPlan {
  detail::PosChunks pc;
  float* z = nullptr;
  double* gd = nullptr;
  size_t bytes = 0;
};

GramPlan plan_gram(const ChannelGramParams& p, const Budget& b, void* base) {
  GramPlan pl;
  const ConvGeom& g = p.g;
  pl.pc = detail::plan_positions(g.positions(), g.C, g.O, b.z_bytes);
  detail::Carver cv{static_cast<char*>(base)};
  pl.z = cv.take<float>(g.C * g.O * pl.pc.ldp);
  pl.gd = cv.take<double>(g.C * g.C);
  pl.bytes = cv.off;
  return pl;
}

}  // namespace

size_t channel_gram_workspace_bytes(const ChannelGramParams& p, const Budget& b) {
  return plan_gram(p, b, nullptr).bytes;
}

cudaError_t channel_gram(const ChannelGramParams& p, void* workspace, size_t workspace_bytes,
                         const Budget& b, cudaStream_t stream) {
  const ConvGeom& g = p.g;
  if (g.C <= 0) return cudaSuccess;
  if (g.positions() <= 0 || g.O <= 0) {
    return cudaMemsetAsync(p.gram, 0, size_t(g.C * g.C) * sizeof(float), stream);
  }
  const GramPlan pl = plan_gram(p, b, workspace);
  if (pl.bytes > workspace_bytes) return cudaErrorInvalidValue;
  AOFP_CUDA_TRY(cudaMemsetAsync(pl.gd, 0, size_t(g.C * g.C) * sizeof(double), stream));
  for (int64_t i = 0; i < pl.pc.n; ++i) {
    const int64_t np = pl.pc.count(i);
    AOFP_CUDA_TRY(detail::launch_z(g, p.x, p.weight, i * pl.pc.Pc, np, pl.pc.ldp, nullptr, p.scale,
                                   pl.z, stream));
    AOFP_CUDA_TRY(detail::launch_syrk(pl.z, g.C, g.O * pl.pc.ldp, pl.gd, stream));
  }
  return detail::launch_gram_to_float(pl.gd, g.C, p.gram, stream);
}

cudaError_t quadratic_damage(const QuadraticDamageParams& p, cudaStream_t stream) {
  if (p.K <= 0) return cudaSuccess;
  if (p.C <= 0) return cudaMemsetAsync(p.damage, 0, size_t(p.K) * sizeof(float), stream);
  return detail::launch_quadratic(p.gram, p.C, p.masks, p.K, p.damage, stream);
}

}  // namespace cuda
}  // namespace aofp
