// Per-channel contributions Z of a follower, and the small per-row passes over them (CUDA).
//
// Z[c][o][p] = conv(x[:, c], W[o, c]) at output position q0 + p of a chunk: the term that channel
// c adds to output channel o. The fused mask kernel (masked_damage_cuda.cu) and the Gram kernel
// (gram_cuda.cu) read Z as C rows of O * ldp floats.
//
// The convolution is computed directly in float32 (no cuDNN: its TF32 default would cost three
// decimal digits), one thread per (4 output channels, position), the input tap loaded once for
// the 4 channels. It is a small part of the work: C * O * P * taps multiply-adds, against
// K * C * O * P for the K masks.
#include "kernels/cuda_common.cuh"

namespace aofp {
namespace cuda {
namespace detail {

namespace {

constexpr int kOT = 4;  // output channels per thread

struct ZArgs {
  ConvGeom g;
  const float* x;
  const float* w;
  int64_t q0, np, ldp;
  const float* zsub;  // (C * O) or nullptr
  const float* zmul;  // (O) or nullptr
  float* z;
};

template <bool SUB, bool MUL>
__global__ void __launch_bounds__(kThreads) z_kernel(const ZArgs a) {
  const ConvGeom& g = a.g;
  const int64_t C = g.C, O = g.O, KK = g.KH * g.KW, HWo = g.HO * g.WO;
  const int64_t n_og = ceil_div(O, kOT);
  const int64_t total = n_og * a.ldp;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t og = idx / a.ldp;
    const int64_t p = idx - og * a.ldp;
    const int64_t o0 = og * kOT;
    const int no = O - o0 < kOT ? int(O - o0) : kOT;
    if (p >= a.np) {  // padding of the chunk: exact zeros
      for (int64_t c = 0; c < C; ++c) {
        float* zc = a.z + (c * O + o0) * a.ldp + p;
#pragma unroll
        for (int t = 0; t < kOT; ++t)
          if (t < no) zc[t * a.ldp] = 0.f;
      }
      continue;
    }
    const int64_t q = a.q0 + p;
    const int64_t n = q / HWo;
    const int64_t r = q - n * HWo;
    const int64_t ho = r / g.WO;
    const int64_t wo = r - ho * g.WO;
    const int64_t ih0 = ho * g.stride_h - g.pad_h;
    const int64_t iw0 = wo * g.stride_w - g.pad_w;
    const float* xn = a.x + n * g.xs[0];
    const int64_t wstride = C * KK;  // between output channels in W
    for (int64_t c = 0; c < C; ++c) {
      float s[kOT];
#pragma unroll
      for (int t = 0; t < kOT; ++t) s[t] = 0.f;
      const float* xc = xn + c * g.xs[1];
      const float* wc = a.w + o0 * wstride + c * KK;
      for (int64_t kh = 0; kh < g.KH; ++kh) {
        const int64_t ih = ih0 + kh * g.dil_h;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          const int64_t iw = iw0 + kw * g.dil_w;
          if (iw < 0 || iw >= g.W) continue;
          const float xv = __ldg(xc + ih * g.xs[2] + iw * g.xs[3]);
          const int64_t tap = kh * g.KW + kw;
#pragma unroll
          for (int t = 0; t < kOT; ++t)
            if (t < no) s[t] = __fmaf_rn(xv, __ldg(wc + t * wstride + tap), s[t]);
        }
      }
      float* zc = a.z + (c * O + o0) * a.ldp + p;
#pragma unroll
      for (int t = 0; t < kOT; ++t) {
        if (t < no) {
          float v = s[t];
          if (SUB) v = __fsub_rn(v, __ldg(a.zsub + c * O + o0 + t));
          if (MUL) v = __fmul_rn(v, __ldg(a.zmul + o0 + t));
          zc[t * a.ldp] = v;
        }
      }
    }
  }
}

__global__ void center_kernel(float* z, int64_t rows, int64_t np, int64_t ldp,
                              const float* zsub) {
  const int64_t total = rows * ldp;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / ldp;
    if (idx - row * ldp < np) z[idx] = __fsub_rn(z[idx], __ldg(zsub + row));
  }
}

__global__ void ysum_kernel(const float* z, int64_t C, int64_t O, int64_t np, int64_t ldp,
                            const float* bias, const float* ymul, const float* yadd, float* yb) {
  const int64_t total = O * ldp;
  const int64_t cstride = O * ldp;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = idx / ldp;
    const int64_t p = idx - o * ldp;
    if (p >= np) {
      yb[idx] = 0.f;
      continue;
    }
    float s = 0.f;
    const float* zp = z + idx;  // z[(c * O + o) * ldp + p] = zp[c * O * ldp]
    for (int64_t c = 0; c < C; ++c) s = __fadd_rn(s, __ldg(zp + c * cstride));
    if (bias) s = __fadd_rn(s, __ldg(bias + o));
    const float m = ymul ? __ldg(ymul + o) : 1.f;
    const float ad = yadd ? __ldg(yadd + o) : 0.f;
    yb[idx] = __fmaf_rn(m, s, ad);
  }
}

// TPR threads per row (32: a warp; 256: the block). One owner per row: deterministic.
template <int TPR>
__global__ void __launch_bounds__(kThreads) row_sums_kernel(const float* m, int64_t R, int64_t n,
                                                            int64_t ld, double* sum, double* sq) {
  constexpr int RPB = kThreads / TPR;
  __shared__ double sh[2][kThreads / 32];
  const int lt = threadIdx.x % TPR;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t rb = blockIdx.x; rb * RPB < R; rb += gridDim.x) {
    const int64_t r = rb * RPB + threadIdx.x / TPR;
    double s = 0.0, q = 0.0;
    if (r < R) {
      const float* row = m + r * ld;
      for (int64_t j = lt; j < n; j += TPR) {
        const double v = double(__ldg(row + j));
        s += v;
        q = fma(v, v, q);
      }
    }
    s = warp_sum(s);
    q = warp_sum(q);
    if (TPR == 32) {
      if (lane == 0 && r < R) {
        sum[r] += s;
        if (sq) sq[r] += q;
      }
    } else {
      if (lane == 0) {
        sh[0][warp] = s;
        sh[1][warp] = q;
      }
      __syncthreads();
      if (threadIdx.x == 0 && r < R) {
        double ts = 0.0, tq = 0.0;
        for (int w = 0; w < kThreads / 32; ++w) {
          ts += sh[0][w];
          tq += sh[1][w];
        }
        sum[r] += ts;
        if (sq) sq[r] += tq;
      }
      __syncthreads();
    }
  }
}

}  // namespace

cudaError_t launch_z(const ConvGeom& g, const float* x, const float* w, int64_t q0, int64_t np,
                     int64_t ldp, const float* zsub, const float* zmul, float* z,
                     cudaStream_t stream) {
  const ZArgs a{g, x, w, q0, np, ldp, zsub, zmul, z};
  const unsigned blocks = grid_for(ceil_div(g.O, kOT) * ldp);
  if (zsub && zmul) {
    z_kernel<true, true><<<blocks, kThreads, 0, stream>>>(a);
  } else if (zsub) {
    z_kernel<true, false><<<blocks, kThreads, 0, stream>>>(a);
  } else if (zmul) {
    z_kernel<false, true><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    z_kernel<false, false><<<blocks, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_center(float* z, int64_t C, int64_t O, int64_t np, int64_t ldp,
                          const float* zsub, cudaStream_t stream) {
  center_kernel<<<grid_for(C * O * ldp), kThreads, 0, stream>>>(z, C * O, np, ldp, zsub);
  return cudaGetLastError();
}

cudaError_t launch_ysum(const float* z, int64_t C, int64_t O, int64_t np, int64_t ldp,
                        const float* bias, const float* ymul, const float* yadd, float* yb,
                        cudaStream_t stream) {
  ysum_kernel<<<grid_for(O * ldp), kThreads, 0, stream>>>(z, C, O, np, ldp, bias, ymul, yadd, yb);
  return cudaGetLastError();
}

cudaError_t launch_row_sums(const float* m, int64_t R, int64_t n, int64_t ld, double* sum,
                            double* sq, cudaStream_t stream) {
  if (R <= 0) return cudaSuccess;
  if (n >= 2048) {
    row_sums_kernel<256><<<unsigned(std::min<int64_t>(R, 65535)), kThreads, 0, stream>>>(
        m, R, n, ld, sum, sq);
  } else {
    row_sums_kernel<32><<<unsigned(std::min<int64_t>(ceil_div(R, kThreads / 32), 65535)),
                          kThreads, 0, stream>>>(m, R, n, ld, sum, sq);
  }
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace aofp
