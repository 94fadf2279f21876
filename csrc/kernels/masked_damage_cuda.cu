// masked_damage on CUDA: the damage of K channel masks at a follower's output (design and
// verification status: docs/cuda-kernels.md).
//
// With z_c = conv(x[:, c], W[:, c]) (zconv_cuda.cu) the output under mask k is y - d_k,
// d_k = sum of z_c over the channels c that mask k removes: one product R (K x C, 0/1) @ Z
// (C x O*P). Three paths:
//
// * linear targets (norm none/affine, post none): damage_k = r_k^T G r_k with the Gram matrix
//   G of the (scale-weighted) Z, in float64 (gram_cuda.cu) -- or, when C is large next to K or
//   G would not fit the budget, the fused kernel below with the epilogue sum (d)^2.
// * post relu without batch statistics: the fused kernel computes d tile by tile in registers
//   and reduces (relu(s*(y - d) + t) - relu(s*y + t))^2 per mask at once.
// * norm batch: BN removes each output channel's mean, so Z is first centred per (c, o)
//   (Z' = Z - mean over the positions; d' = R Z' is d minus a constant per (k, o)); one fused
//   pass gathers, per (k, o), S_d = sum d', S_ud = sum u d', S_dd = sum d'^2 and
//   S_vv = sum (u - d')^2 with u the centred base output; the statistics of every masked
//   output follow (its variance from S_vv directly), and the damage either in closed form
//   (post none, the two regimes of the CPU kernel) or from a second fused pass that applies each
//   mask's own normalisation and the relu (post relu). Centring keeps the sums free of the
//   cancellation that raw sums of large-mean activations would suffer. A mask that removes
//   nothing gets exactly 0; one that removes everything leaves the bias alone (BN gives shift).
//
// The fused kernel is an FP32 SIMT GEMM: 128 (masks) x 128 (positions of one output channel)
// tiles, 16 channels per step, double-buffered in shared memory, 8 x 8 outputs per thread. The
// K masked outputs are never stored: each tile's 8 x 8 values are reduced in registers (float32,
// at most 32 terms per thread), across the 16 threads of a row by warp shuffles, into float64
// per row in shared memory, and into the float64 result by one atomic per (row, output channel
// or block). Because the masks are 0/1, every product in R @ Z is exact: d is the float32 sum
// of the removed contributions in channel order.
#include "kernels/cuda_common.cuh"

namespace aofp {
namespace cuda {

using detail::ceil_div;
using detail::kThreads;
using detail::relu;
using detail::round_up;

namespace {

constexpr int BM = 128;  // masks per tile
constexpr int BN = 128;  // positions per tile (one output channel)
constexpr int BK = 16;   // channels per step
constexpr int kFlushTiles = 4;
constexpr int kStatsPer = 4;  // kStats sums per (k, o): d, u d, d^2, (u - d)^2

enum Mode : int { kLinear = 0, kRelu = 1, kStats = 2, kBnRelu = 3 };

struct FusedArgs {
  const float* rT;  // (C, ldk): rT[c][k] = 1 if mask k removes channel c, 0 else (0 for k >= K)
  int64_t ldk;
  int64_t K;        // masks in this chunk
  int64_t C, O;
  const float* z;   // (C, O, ldp)
  const float* yb;  // (O, ldp): kRelu: s*y + t; kStats/kBnRelu: u (centred y); unused: kLinear
  int64_t np, ldp;  // valid positions of the chunk, row length
  const float* o_mul;   // (O): kRelu: s (nullptr = 1); kBnRelu: a
  const float* o_add;   // (O): kBnRelu: c_base
  const float* ko_mul;  // (K, O): kBnRelu: a_k
  const float* ko_add;  // (K, O): kBnRelu: c_k
  double* out;          // kStats: (K, O, kStatsPer); others: (K)
};

__device__ __forceinline__ float4 ldg4(const float* p) {
  return __ldg(reinterpret_cast<const float4*>(p));
}

// Thread (tx, ty) of 16 x 16 owns tile rows ty*4 + {0..3} and 64 + ty*4 + {0..3}, and the same
// columns with tx: conflict-free float4 reads from shared memory.
__device__ __forceinline__ int tile_index(int t, int i) { return (i & 3) + t * 4 + (i >> 2) * 64; }

template <int MODE>
__global__ void __launch_bounds__(kThreads, MODE == kStats ? 1 : 2) fused_kernel(const FusedArgs a) {
  constexpr int NS = MODE == kStats ? kStatsPer : 1;
  __shared__ __align__(16) float As[2][BK][BM];
  __shared__ __align__(16) float Bs[2][BK][BN];
  __shared__ double sstat[BM][NS];

  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int64_t k0 = int64_t(blockIdx.x) * BM;
  const int64_t by = blockIdx.y, gy = gridDim.y, bz = blockIdx.z, gz = gridDim.z;
  const int64_t ntp = ceil_div(a.np, BN);
  // This block's tiles: output channels o = by + i*gy, position tiles pt = bz + j*gz.
  const int64_t n_o = by < a.O ? (a.O - 1 - by) / gy + 1 : 0;
  const int64_t n_pt = bz < ntp ? (ntp - 1 - bz) / gz + 1 : 0;
  const int64_t nks = ceil_div(a.C, BK);
  const int64_t nsteps = n_o * n_pt * nks;
  if (nsteps == 0) return;  // uniform over the block

  // Row r of sstat belongs to the thread (ty = row group, tx = 0): no synchronisation needed.
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int s = 0; s < NS; ++s) sstat[tile_index(ty, i)][s] = 0.0;
  }

  // Global -> shared loads: each thread moves 2 float4 of R and 2 float4 of Z per step.
  const int lrow = tid >> 5;          // 0..7 (+8)
  const int lcol = (tid & 31) * 4;    // 0..124
  float4 ra[2], rb[2];
  // Position of the next load and of the step being computed, advanced without divisions:
  // (output channel index oi, position tile index tin within it, channel step ks).
  int64_t ld_oi = 0, ld_tin = 0, ld_ks = 0;
  int64_t cu_oi = 0, cu_tin = 0, cu_ks = 0;
  auto advance = [&](int64_t& oi, int64_t& tin, int64_t& ks) {
    if (++ks == nks) {
      ks = 0;
      if (++tin == n_pt) {
        tin = 0;
        ++oi;
      }
    }
  };
  auto load = [&]() {
    const int64_t o = by + ld_oi * gy;
    const int64_t pt = bz + ld_tin * gz;
    const int64_t kk = k0 + lcol;
    const int64_t p = pt * BN + lcol;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t c = ld_ks * BK + lrow + h * 8;
      ra[h] = (c < a.C && kk < a.ldk) ? ldg4(a.rT + c * a.ldk + kk) : make_float4(0.f, 0.f, 0.f, 0.f);
      rb[h] = (c < a.C && p < a.ldp) ? ldg4(a.z + (c * a.O + o) * a.ldp + p)
                                     : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    advance(ld_oi, ld_tin, ld_ks);
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      *reinterpret_cast<float4*>(&As[buf][lrow + h * 8][lcol]) = ra[h];
      *reinterpret_cast<float4*>(&Bs[buf][lrow + h * 8][lcol]) = rb[h];
    }
  };

  float acc[8][8];
  float sacc[8][NS];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
#pragma unroll
    for (int s = 0; s < NS; ++s) sacc[i][s] = 0.f;
  }

  load();
  store(0);
  __syncthreads();
  int buf = 0;
  for (int64_t step = 0; step < nsteps; ++step) {
    const bool more = step + 1 < nsteps;
    if (more) load();  // in flight while this step computes
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][64 + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&Bs[buf][kk][64 + tx * 4]);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = __fmaf_rn(av[i], bv[j], acc[i][j]);
    }
    if (more) store(buf ^ 1);

    if (cu_ks == nks - 1) {
      // ---- epilogue of the tile: reduce its 8 x 8 values of d in registers ----
      const int64_t o = by + cu_oi * gy;
      const int64_t tin = cu_tin;  // tile index within output channel o
      const int64_t pt = bz + tin * gz;
      float yv[8];
      bool cv[8];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t p4 = pt * BN + tx * 4 + h * 64;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (MODE != kLinear && p4 < a.ldp) v = ldg4(a.yb + o * a.ldp + p4);
        yv[h * 4 + 0] = v.x;
        yv[h * 4 + 1] = v.y;
        yv[h * 4 + 2] = v.z;
        yv[h * 4 + 3] = v.w;
#pragma unroll
        for (int e = 0; e < 4; ++e) cv[h * 4 + e] = p4 + e < a.np;
      }
      if (MODE == kLinear) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float s = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float d = acc[i][j];
            s = cv[j] ? __fmaf_rn(d, d, s) : s;
          }
          sacc[i][0] += s;
        }
      } else if (MODE == kRelu) {
        // f(y_k) - f(y) = relu(yb - m d) - relu(yb), yb = m y + t
        const float m = a.o_mul ? __ldg(a.o_mul + o) : 1.f;
        float base[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) base[j] = relu(yv[j]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float s = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float df = relu(__fmaf_rn(-m, acc[i][j], yv[j])) - base[j];
            s = cv[j] ? __fmaf_rn(df, df, s) : s;
          }
          sacc[i][0] += s;
        }
      } else if (MODE == kStats) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float d = cv[j] ? acc[i][j] : 0.f;
            const float u = cv[j] ? yv[j] : 0.f;
            const float v = __fsub_rn(u, d);  // the masked output, up to a constant
            s0 += d;
            s1 = __fmaf_rn(u, d, s1);
            s2 = __fmaf_rn(d, d, s2);
            s3 = __fmaf_rn(v, v, s3);
          }
          sacc[i][0] += s0;
          sacc[i][1] += s1;
          sacc[i][2] += s2;
          sacc[i][3] += s3;
        }
      } else {  // kBnRelu: relu(a_k (u - d) + c_k) - relu(a u + c)
        const float am = __ldg(a.o_mul + o), cb = __ldg(a.o_add + o);
        float base[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) base[j] = relu(__fmaf_rn(am, yv[j], cb));
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t k = k0 + tile_index(ty, i);
          float ak = 0.f, ck = 0.f;
          if (k < a.K) {
            ak = __ldg(a.ko_mul + k * a.O + o);
            ck = __ldg(a.ko_add + k * a.O + o);
          }
          float s = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float df = relu(__fmaf_rn(ak, __fsub_rn(yv[j], acc[i][j]), ck)) - base[j];
            s = cv[j] ? __fmaf_rn(df, df, s) : s;
          }
          sacc[i][0] += s;
        }
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

      // ---- flush: 16 threads of a row -> float64 row sums in shared memory ----
      const bool last_of_o = tin == n_pt - 1;
      if (last_of_o || (tin + 1) % kFlushTiles == 0) {  // uniform over the block
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
          for (int s = 0; s < NS; ++s) {
            float v = sacc[i][s];
            v += __shfl_xor_sync(0xffffffffu, v, 8);
            v += __shfl_xor_sync(0xffffffffu, v, 4);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            if (tx == 0) sstat[tile_index(ty, i)][s] += double(v);
            sacc[i][s] = 0.f;
          }
        }
      }
      if (MODE == kStats && last_of_o && tx == 0) {  // per (k, o) sums are complete
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int r = tile_index(ty, i);
          const int64_t k = k0 + r;
#pragma unroll
          for (int s = 0; s < NS; ++s) {
            if (k < a.K) atomicAdd(a.out + (k * a.O + o) * kStatsPer + s, sstat[r][s]);
            sstat[r][s] = 0.0;
          }
        }
      }
    }
    advance(cu_oi, cu_tin, cu_ks);
    __syncthreads();
    buf ^= 1;
  }
  if (MODE != kStats && tx == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = tile_index(ty, i);
      const int64_t k = k0 + r;
      if (k < a.K) atomicAdd(a.out + k, sstat[r][0]);
    }
  }
}

cudaError_t launch_fused(int mode, const FusedArgs& a, cudaStream_t stream) {
  const int64_t gx = ceil_div(a.K, BM);
  const int64_t gy = std::min<int64_t>(a.O, 65535);
  const int64_t ntp = ceil_div(a.np, BN);
  const int64_t target = int64_t(detail::sm_count()) * 8;
  const int64_t gz =
      std::max<int64_t>(1, std::min<int64_t>({ceil_div(target, gx * gy), ntp, 65535}));
  if (gx > 2147483647LL) return cudaErrorInvalidConfiguration;
  const dim3 grid{unsigned(gx), unsigned(gy), unsigned(gz)};
  switch (mode) {
    case kLinear: fused_kernel<kLinear><<<grid, kThreads, 0, stream>>>(a); break;
    case kRelu: fused_kernel<kRelu><<<grid, kThreads, 0, stream>>>(a); break;
    case kStats: fused_kernel<kStats><<<grid, kThreads, 0, stream>>>(a); break;
    default: fused_kernel<kBnRelu><<<grid, kThreads, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

// ---- small kernels ---------------------------------------------------------------------------

// rT[c][k] = 1 if mask k0 + k removes channel c (k < nk), else 0.
__global__ void rmat_kernel(const uint8_t* masks, int64_t k0, int64_t nk, int64_t C, int64_t ldk,
                            float* rT) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < C * ldk;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx / ldk, k = idx - c * ldk;
    rT[idx] = (k < nk && __ldg(masks + (k0 + k) * C + c) == 0) ? 1.f : 0.f;
  }
}

__global__ void mean_to_float_kernel(const double* s, int64_t n, double P, float* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = float(s[i] / P);
}

__global__ void to_float_kernel(const double* s, int64_t n, float* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = float(s[i]);
}

// BatchNorm gain scale / sqrt(var + eps), in float64.
__device__ __forceinline__ double bn_gain(double scale, double var, double eps) {
  return scale / sqrt(var + eps);
}

// Base statistics per o from the sums of u over all positions.
__global__ void bn_base_kernel(const double* su, const double* suu, int64_t O, double P,
                               const float* scale, const float* shift, double eps,
                               double* mean_u, double* var_y, float* a_f, float* cb_f) {
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < O;
       o += int64_t(gridDim.x) * blockDim.x) {
    const double mu = su[o] / P;
    double var = suu[o] / P - mu * mu;
    var = var < 0.0 ? 0.0 : var;
    const float af = float(bn_gain(double(scale[o]), var, eps));
    mean_u[o] = mu;
    var_y[o] = var;
    a_f[o] = af;
    cb_f[o] = __fmaf_rn(af, float(0.0 - mu), shift[o]);
  }
}

// What a mask removes: 1 = nothing (damage exactly 0), 2 = every channel (the output is the bias
// alone: BN gives `shift`), 0 = some.
__global__ void mask_kind_kernel(const uint8_t* masks, int64_t k0, int64_t nk, int64_t C,
                                 uint8_t* kind) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < nk;
       k += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t* m = masks + (k0 + k) * C;
    bool any_keep = false, any_drop = false;
    for (int64_t c = 0; c < C && !(any_keep && any_drop); ++c) {
      if (__ldg(m + c)) any_keep = true; else any_drop = true;
    }
    kind[k] = !any_drop ? 1 : (!any_keep ? 2 : 0);
  }
}

// Statistics of masked output (k, o) from the sums S = (d', u d', d'^2, (u - d')^2), u the
// centred base output (mean mean_u), d' the centred removed part: with e = d' - mean d' and
// w = u - mean_u, the masked output is centred v = w - e. Its variance comes from the direct
// sum of (u - d')^2, not from var_y - 2 cov + var_d, which cancels when a mask removes most of
// the variance.
struct MaskStats {
  double md;     // mean d'
  double swe;    // sum w e
  double see;    // sum e^2
  double svv;    // sum v^2 = P var_k
  double var_k;
};
__device__ __forceinline__ MaskStats mask_stats(const double* s4, double P, double mean_u) {
  MaskStats m;
  const double sd = s4[0], sud = s4[1], sdd = s4[2], s_vv = s4[3];
  m.md = sd / P;
  m.swe = sud - mean_u * sd;
  const double see = sdd - sd * m.md;
  m.see = see < 0.0 ? 0.0 : see;
  const double mv = mean_u - m.md;  // mean of u - d'
  const double svv = s_vv - P * mv * mv;
  m.svv = svv < 0.0 ? 0.0 : svv;
  m.var_k = m.svv / P;
  return m;
}

// post = none: damage_ko = sum (a_k v - a w)^2, expanded two ways, each free of cancellation in
// its own regime (as the CPU kernel does):
//   near the base (|a_k| <= 2|a|): (a_k - a)^2 P var_y - 2 a_k (a_k - a) sum we + a_k^2 sum e^2
//   far from it:                    a_k^2 sum v^2 - 2 a a_k (P var_y - sum we) + a^2 P var_y
// summed over o in float64, one thread per mask (deterministic).
__global__ void bn_none_kernel(const double* st, const uint8_t* kind, int64_t nk, int64_t O,
                               double P, const double* mean_u, const double* var_y,
                               const float* scale, double eps, float* damage) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < nk;
       k += int64_t(gridDim.x) * blockDim.x) {
    double total = 0.0;
    if (kind[k] != 1) {
      for (int64_t o = 0; o < O; ++o) {
        const double s = double(scale[o]), vy = var_y[o];
        const double a = bn_gain(s, vy, eps);
        if (kind[k] == 2) {
          total += a * a * P * vy;  // the output is `shift` everywhere
          continue;
        }
        const MaskStats m = mask_stats(st + (k * O + o) * kStatsPer, P, mean_u[o]);
        const double ak = bn_gain(s, m.var_k, eps);
        double dmg;
        if (fabs(ak) <= 2.0 * fabs(a)) {
          dmg = (ak - a) * (ak - a) * P * vy - 2.0 * ak * (ak - a) * m.swe + ak * ak * m.see;
        } else {
          dmg = ak * ak * m.svv - 2.0 * a * ak * (P * vy - m.swe) + a * a * P * vy;
        }
        total += dmg < 0.0 ? 0.0 : dmg;  // a sum of squares (NaN passes through)
      }
    }
    damage[k] = float(total);
  }
}

// post = relu: per (k, o) slope a_k and offset c_k of the masked output a_k (u - d') + c_k,
// c_k = a_k (mean d' - mean_u) + shift; the base coefficients for a mask that removes nothing
// (so its damage is exactly 0), slope 0 and offset shift for one that removes everything.
__global__ void bn_relu_coef_kernel(const double* st, const uint8_t* kind, int64_t nk, int64_t O,
                                    double P, const double* mean_u, const float* a_f,
                                    const float* cb_f, const float* scale, const float* shift,
                                    double eps, float* ak_f, float* ck_f) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < nk * O;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = idx / O, o = idx - k * O;
    if (kind[k] == 1) {
      ak_f[idx] = a_f[o];
      ck_f[idx] = cb_f[o];
    } else if (kind[k] == 2) {
      ak_f[idx] = 0.f;
      ck_f[idx] = shift[o];
    } else {
      const MaskStats m = mask_stats(st + idx * kStatsPer, P, mean_u[o]);
      const float akf = float(bn_gain(double(scale[o]), m.var_k, eps));
      ak_f[idx] = akf;
      ck_f[idx] = __fmaf_rn(akf, float(m.md - mean_u[o]), shift[o]);
    }
  }
}

// ---- plan and workspace ----------------------------------------------------------------------

enum class Path { Gram, Fused };

struct Plan {
  Path path = Path::Gram;
  int mode = kLinear;       // fused mode of the last pass
  bool batch = false;
  detail::PosChunks pc;
  int64_t Kc = 0, ldk = 0, nkc = 0;  // masks per chunk
  // workspace pieces
  float* z = nullptr;       // (C, O, ldp)
  float* yb = nullptr;      // (O, ldp)
  float* rT = nullptr;      // (C, ldk)
  double* acc = nullptr;    // (Kc)
  double* st = nullptr;     // (Kc, O, kStatsPer)
  uint8_t* kind = nullptr;  // (Kc)
  double* gd = nullptr;     // (C, C)
  double* zsum = nullptr;   // (C * O)
  float* zbar = nullptr;    // (C * O)
  double* su = nullptr;     // (O) x 4: sum u, sum u^2, mean u, var y
  double* suu = nullptr;
  double* mean_u = nullptr;
  double* var_y = nullptr;
  float* a_f = nullptr;     // (O)
  float* cb_f = nullptr;    // (O)
  float* ak_f = nullptr;    // (Kc, O)
  float* ck_f = nullptr;    // (Kc, O)
  size_t bytes = 0;
};

Plan make_plan(const MaskedDamageParams& p, const Budget& b, void* base) {
  Plan pl;
  const ConvGeom& g = p.g;
  const int64_t C = g.C, O = g.O, K = p.K;
  pl.batch = p.norm == Norm::Batch;
  pl.pc = detail::plan_positions(g.positions(), C, O, b.z_bytes);
  if (!pl.batch && p.post == Post::None) {
    // Gram (C^2 O P / 2 multiply-adds) unless the fused product (K' C O P, K' = K rounded up to
    // the tile) is cheaper, or G does not fit the budget.
    const bool gram_fits = C * C * int64_t(sizeof(double)) <= std::max(b.z_bytes, b.mask_bytes);
    pl.path = (gram_fits && C <= 2 * round_up(K, BM)) ? Path::Gram : Path::Fused;
    pl.mode = kLinear;
  } else {
    pl.path = Path::Fused;
    pl.mode = pl.batch ? (p.post == Post::Relu ? kBnRelu : kStats) : kRelu;
  }

  detail::Carver cv{static_cast<char*>(base)};
  pl.z = cv.take<float>(C * O * pl.pc.ldp);
  if (pl.path == Path::Gram) {
    pl.gd = cv.take<double>(C * C);
    pl.bytes = cv.off;
    return pl;
  }
  if (pl.mode != kLinear) pl.yb = cv.take<float>(O * pl.pc.ldp);

  int64_t per_mask = C * int64_t(sizeof(float)) + int64_t(sizeof(double));
  if (pl.batch) per_mask += 1 + O * (kStatsPer * int64_t(sizeof(double)) + 2 * int64_t(sizeof(float)));
  int64_t kc = std::max<int64_t>(BM, b.mask_bytes / per_mask);
  if (kc < K) kc = kc / BM * BM;
  pl.Kc = std::min(K, kc);
  pl.ldk = round_up(pl.Kc, 4);
  pl.nkc = ceil_div(K, pl.Kc);
  pl.rT = cv.take<float>(C * pl.ldk);
  pl.acc = cv.take<double>(pl.Kc);
  if (pl.batch) {
    pl.st = cv.take<double>(pl.Kc * O * kStatsPer);
    pl.kind = cv.take<uint8_t>(pl.Kc);
    pl.zsum = cv.take<double>(C * O);
    pl.zbar = cv.take<float>(C * O);
    pl.su = cv.take<double>(O);
    pl.suu = cv.take<double>(O);
    pl.mean_u = cv.take<double>(O);
    pl.var_y = cv.take<double>(O);
    pl.a_f = cv.take<float>(O);
    pl.cb_f = cv.take<float>(O);
    if (p.post == Post::Relu) {
      pl.ak_f = cv.take<float>(pl.Kc * O);
      pl.ck_f = cv.take<float>(pl.Kc * O);
    }
  }
  pl.bytes = cv.off;
  return pl;
}

// Which chunk of Z (and of yb) the workspace holds, so that a single-chunk problem computes Z
// once for all passes.
struct ZCache {
  int64_t z_chunk = -1;
  bool z_centred = false;
  int64_t y_chunk = -1;
};

}  // namespace

size_t masked_damage_workspace_bytes(const MaskedDamageParams& p, const Budget& b) {
  return make_plan(p, b, nullptr).bytes;
}

cudaError_t masked_damage(const MaskedDamageParams& p, void* workspace, size_t workspace_bytes,
                          const Budget& b, cudaStream_t stream) {
  const ConvGeom& g = p.g;
  const int64_t C = g.C, O = g.O, K = p.K, P = g.positions();
  if (K <= 0) return cudaSuccess;
  if (C <= 0 || O <= 0 || P <= 0) {
    return cudaMemsetAsync(p.damage, 0, size_t(K) * sizeof(float), stream);
  }
  const Plan pl = make_plan(p, b, workspace);
  if (pl.bytes > workspace_bytes) return cudaErrorInvalidValue;
  const detail::PosChunks& pc = pl.pc;
  const bool affine = p.norm == Norm::Affine;

  if (pl.path == Path::Gram) {
    AOFP_CUDA_TRY(cudaMemsetAsync(pl.gd, 0, size_t(C * C) * sizeof(double), stream));
    for (int64_t i = 0; i < pc.n; ++i) {
      AOFP_CUDA_TRY(detail::launch_z(g, p.x, p.weight, i * pc.Pc, pc.count(i), pc.ldp, nullptr,
                                     affine ? p.scale : nullptr, pl.z, stream));
      AOFP_CUDA_TRY(detail::launch_syrk(pl.z, C, O * pc.ldp, pl.gd, stream));
    }
    AOFP_CUDA_TRY(detail::launch_symmetrize(pl.gd, C, stream));
    return detail::launch_quadratic(pl.gd, C, p.masks, K, p.damage, stream);
  }

  ZCache cache;
  // Z of chunk i: centred (batch) or scaled by `scale` (linear, affine) or plain.
  const float* zmul = (pl.mode == kLinear && affine) ? p.scale : nullptr;
  auto ensure_z = [&](int64_t i, bool centred) -> cudaError_t {
    if (cache.z_chunk == i && cache.z_centred == centred) return cudaSuccess;
    if (cache.z_chunk == i && centred && !cache.z_centred) {
      AOFP_CUDA_TRY(detail::launch_center(pl.z, C, O, pc.count(i), pc.ldp, pl.zbar, stream));
    } else {
      AOFP_CUDA_TRY(detail::launch_z(g, p.x, p.weight, i * pc.Pc, pc.count(i), pc.ldp,
                                     centred ? pl.zbar : nullptr, zmul, pl.z, stream));
    }
    cache.z_chunk = i;
    cache.z_centred = centred;
    cache.y_chunk = -1;
    return cudaSuccess;
  };
  // yb of chunk i (after ensure_z): batch: u = sum_c z'_c; relu: s * (sum_c z_c + bias) + t.
  auto ensure_y = [&](int64_t i) -> cudaError_t {
    if (cache.y_chunk == i) return cudaSuccess;
    if (pl.batch) {
      AOFP_CUDA_TRY(detail::launch_ysum(pl.z, C, O, pc.count(i), pc.ldp, nullptr, nullptr,
                                        nullptr, pl.yb, stream));
    } else {
      AOFP_CUDA_TRY(detail::launch_ysum(pl.z, C, O, pc.count(i), pc.ldp, p.bias,
                                        affine ? p.scale : nullptr, affine ? p.shift : nullptr,
                                        pl.yb, stream));
    }
    cache.y_chunk = i;
    return cudaSuccess;
  };

  FusedArgs fa{};
  fa.rT = pl.rT;
  fa.ldk = pl.ldk;
  fa.C = C;
  fa.O = O;
  fa.z = pl.z;
  fa.yb = pl.yb;
  fa.ldp = pc.ldp;
  const double Pd = double(P);

  if (pl.batch) {
    // Pass 0: the mean of every z_c over all positions (to centre Z).
    AOFP_CUDA_TRY(cudaMemsetAsync(pl.zsum, 0, size_t(C * O) * sizeof(double), stream));
    for (int64_t i = 0; i < pc.n; ++i) {
      AOFP_CUDA_TRY(ensure_z(i, false));
      AOFP_CUDA_TRY(detail::launch_row_sums(pl.z, C * O, pc.count(i), pc.ldp, pl.zsum, nullptr,
                                            stream));
    }
    mean_to_float_kernel<<<detail::grid_for(C * O), kThreads, 0, stream>>>(pl.zsum, C * O, Pd,
                                                                            pl.zbar);
    AOFP_CUDA_TRY(cudaGetLastError());
    AOFP_CUDA_TRY(cudaMemsetAsync(pl.su, 0, size_t(O) * sizeof(double), stream));
    AOFP_CUDA_TRY(cudaMemsetAsync(pl.suu, 0, size_t(O) * sizeof(double), stream));
  }

  for (int64_t kc = 0; kc < pl.nkc; ++kc) {
    const int64_t k0 = kc * pl.Kc;
    const int64_t nk = std::min(pl.Kc, K - k0);
    rmat_kernel<<<detail::grid_for(C * pl.ldk), kThreads, 0, stream>>>(p.masks, k0, nk, C,
                                                                       pl.ldk, pl.rT);
    AOFP_CUDA_TRY(cudaGetLastError());
    fa.K = nk;

    if (!pl.batch) {
      AOFP_CUDA_TRY(cudaMemsetAsync(pl.acc, 0, size_t(nk) * sizeof(double), stream));
      fa.o_mul = (pl.mode == kRelu && affine) ? p.scale : nullptr;
      fa.out = pl.acc;
      for (int64_t i = 0; i < pc.n; ++i) {
        AOFP_CUDA_TRY(ensure_z(i, false));
        if (pl.mode == kRelu) AOFP_CUDA_TRY(ensure_y(i));
        fa.np = pc.count(i);
        AOFP_CUDA_TRY(launch_fused(pl.mode, fa, stream));
      }
      to_float_kernel<<<detail::grid_for(nk), kThreads, 0, stream>>>(pl.acc, nk, p.damage + k0);
      AOFP_CUDA_TRY(cudaGetLastError());
      continue;
    }

    // Pass 1: per (k, o) sums of d', u d', d'^2, (u - d')^2 (and, once, the sums of u for var y).
    AOFP_CUDA_TRY(cudaMemsetAsync(pl.st, 0, size_t(nk * O * kStatsPer) * sizeof(double), stream));
    mask_kind_kernel<<<detail::grid_for(nk), kThreads, 0, stream>>>(p.masks, k0, nk, C, pl.kind);
    AOFP_CUDA_TRY(cudaGetLastError());
    fa.out = pl.st;
    fa.o_mul = fa.o_add = fa.ko_mul = fa.ko_add = nullptr;
    for (int64_t i = 0; i < pc.n; ++i) {
      AOFP_CUDA_TRY(ensure_z(i, true));
      AOFP_CUDA_TRY(ensure_y(i));
      if (kc == 0) {
        AOFP_CUDA_TRY(detail::launch_row_sums(pl.yb, O, pc.count(i), pc.ldp, pl.su, pl.suu,
                                              stream));
      }
      fa.np = pc.count(i);
      AOFP_CUDA_TRY(launch_fused(kStats, fa, stream));
    }
    if (kc == 0) {
      bn_base_kernel<<<detail::grid_for(O), kThreads, 0, stream>>>(
          pl.su, pl.suu, O, Pd, p.scale, p.shift, p.eps, pl.mean_u, pl.var_y, pl.a_f, pl.cb_f);
      AOFP_CUDA_TRY(cudaGetLastError());
    }
    if (p.post == Post::None) {
      bn_none_kernel<<<detail::grid_for(nk, 128), 128, 0, stream>>>(
          pl.st, pl.kind, nk, O, Pd, pl.mean_u, pl.var_y, p.scale, p.eps, p.damage + k0);
      AOFP_CUDA_TRY(cudaGetLastError());
      continue;
    }

    // Pass 2 (post relu): each mask's own normalisation, then the clipped squared differences.
    bn_relu_coef_kernel<<<detail::grid_for(nk * O), kThreads, 0, stream>>>(
        pl.st, pl.kind, nk, O, Pd, pl.mean_u, pl.a_f, pl.cb_f, p.scale, p.shift, p.eps, pl.ak_f,
        pl.ck_f);
    AOFP_CUDA_TRY(cudaGetLastError());
    AOFP_CUDA_TRY(cudaMemsetAsync(pl.acc, 0, size_t(nk) * sizeof(double), stream));
    fa.out = pl.acc;
    fa.o_mul = pl.a_f;
    fa.o_add = pl.cb_f;
    fa.ko_mul = pl.ak_f;
    fa.ko_add = pl.ck_f;
    for (int64_t i = 0; i < pc.n; ++i) {
      AOFP_CUDA_TRY(ensure_z(i, true));
      AOFP_CUDA_TRY(ensure_y(i));
      fa.np = pc.count(i);
      AOFP_CUDA_TRY(launch_fused(kBnRelu, fa, stream));
    }
    to_float_kernel<<<detail::grid_for(nk), kThreads, 0, stream>>>(pl.acc, nk, p.damage + k0);
    AOFP_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace aofp
