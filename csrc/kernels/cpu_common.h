// Shared pieces of the CPU kernels: im2col of a range of output positions, the per-channel
// contributions Z, a symmetric rank-k update (SYRK), target clones for the hot loops.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/kernels.h"

// Hot loops are compiled for AVX-512, AVX2+FMA and the baseline, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(AOFP_NO_CLONES)
#define AOFP_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AOFP_HOT
#endif
#define AOFP_INLINE inline __attribute__((always_inline))

namespace aofp {
namespace cpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 16 floats as one GCC vector: one AVX-512 register, two AVX2 ones, four SSE ones (whichever
// the function it is inlined into is compiled for).
typedef float v16f __attribute__((vector_size(64)));

// The first 64-byte boundary at or after p (a buffer allocated 16 floats longer holds its data
// from there).
inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

AOFP_INLINE v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// A float buffer whose data starts on a 64-byte boundary (a cache line; every 16-float vector
// at a multiple of 16 floats from it is one line, not two). Zero-filled.
class AlignedFloats {
 public:
  AlignedFloats() = default;
  explicit AlignedFloats(size_t n) : buf_(n + 16, 0.f) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(buf_.data());
    ptr_ = buf_.data() + ((64 - a % 64) % 64) / sizeof(float);
  }
  float* data() { return ptr_; }
  const float* data() const { return ptr_; }

 private:
  std::vector<float> buf_;
  float* ptr_ = nullptr;
};

// The output positions [q0, q0 + n) of the follower, flattened over (n, ho, wo), as im2col rows:
// cols[(c * KH*KW + kk) * ld + j] = x[n, c, ih, iw] (0 outside the input), for c in [c0, c1).
// Positions are kept as runs along wo (same n and ho), so each run of a row is one strided
// (for stride 1 and unit W stride: contiguous) copy with zero fill at the borders.
struct PositionRange {
  struct Run {
    int64_t j = 0, len = 0;   // first position in the range, positions in the run
    int64_t xoff = 0;         // n * xs[0]
    int64_t ih0 = 0;          // ho * stride_h - pad_h
    int64_t iw0 = 0;          // wo_first * stride_w - pad_w
  };
  int64_t q0 = 0, n = 0;
  std::vector<Run> runs;

  void set(const ConvGeom& g, int64_t q_begin, int64_t count) {
    q0 = q_begin;
    n = count;
    runs.clear();
    const int64_t hw = g.HO * g.WO;
    for (int64_t j = 0; j < count;) {
      const int64_t q = q_begin + j;
      const int64_t nn = q / hw, r = q % hw, ho = r / g.WO, wo = r % g.WO;
      Run run;
      run.j = j;
      run.len = std::min(g.WO - wo, count - j);
      run.xoff = nn * g.xs[0];
      run.ih0 = ho * g.stride_h - g.pad_h;
      run.iw0 = wo * g.stride_w - g.pad_w;
      runs.push_back(run);
      j += run.len;
    }
  }
};

// With `list`, rows i in [c0, c1) hold channel list[i] (a subset of the channels, packed).
inline void im2col_channels(const ConvGeom& g, const float* x, const PositionRange& pr,
                            int64_t c0, int64_t c1, float* cols, int64_t ld,
                            const int32_t* list = nullptr) {
  const int64_t KK = g.taps(), sw = g.stride_w, xs3 = g.xs[3];
  for (int64_t i = c0; i < c1; ++i) {
    const int64_t c = list ? int64_t(list[i]) : i;
    const float* xc = x + c * g.xs[1];
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        float* row = cols + (i * KK + kh * g.KW + kw) * ld;
        const int64_t dh = kh * g.dil_h, dw = kw * g.dil_w;
        for (const PositionRange::Run& run : pr.runs) {
          float* out = row + run.j;
          const int64_t ih = run.ih0 + dh;
          if (ih < 0 || ih >= g.H) {
            std::fill(out, out + run.len, 0.0f);
            continue;
          }
          // valid t in [t0, t1): 0 <= iw0 + dw + t * sw < W
          const int64_t base = run.iw0 + dw;
          const int64_t t0 = base >= 0 ? 0 : std::min(run.len, (-base + sw - 1) / sw);
          const int64_t t1 =
              base >= g.W ? t0 : std::max(t0, std::min(run.len, (g.W - base + sw - 1) / sw));
          std::fill(out, out + t0, 0.0f);
          const float* src = xc + run.xoff + ih * g.xs[2] + base * xs3;
          if (sw == 1 && xs3 == 1) {
            std::copy(src + t0, src + t1, out + t0);
          } else {
            const int64_t step = sw * xs3;
            for (int64_t t = t0; t < t1; ++t) out[t] = src[t * step];
          }
          std::fill(out + t1, out + run.len, 0.0f);
        }
      }
    }
  }
}

// The per-channel contributions of a tile: for c in [c0, c1) and o in [o0, o0 + no),
// z[(c * zo + (o - o0)) * ldz + j] = s_o * sum over taps of W[o, c, tap] * cols[(c, tap)][j0 + j]
// for j in [0, n), with s_o = scale[o] (1 without scale). Four output channels share each
// im2col load. weight is contiguous (O, C, taps).
AOFP_INLINE void contributions(const float* weight, const float* scale, int64_t C, int64_t KK,
                               const float* cols, int64_t ld, int64_t j0, int64_t n,
                               int64_t o0, int64_t no, int64_t c0, int64_t c1, float* z,
                               int64_t zo, int64_t ldz) {
  constexpr int64_t kMaxTaps = 64;  // taps of four channels held on the stack
  for (int64_t c = c0; c < c1; ++c) {
    const float* __restrict col = cols + (c * KK) * ld + j0;
    int64_t ol = 0;
    for (; KK <= kMaxTaps && ol + 4 <= no; ol += 4) {
      float w[4][kMaxTaps];
      for (int u = 0; u < 4; ++u) {
        const int64_t o = o0 + ol + u;
        const float s = scale ? scale[o] : 1.f;
        for (int64_t kk = 0; kk < KK; ++kk) w[u][kk] = s * weight[(o * C + c) * KK + kk];
      }
      float* __restrict z0 = z + (c * zo + ol) * ldz;
      float* __restrict z1 = z0 + ldz;
      float* __restrict z2 = z1 + ldz;
      float* __restrict z3 = z2 + ldz;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float v = col[j];
        z0[j] = w[0][0] * v;
        z1[j] = w[1][0] * v;
        z2[j] = w[2][0] * v;
        z3[j] = w[3][0] * v;
      }
      for (int64_t kk = 1; kk < KK; ++kk) {
        const float* __restrict ck = col + kk * ld;
        const float a0 = w[0][kk], a1 = w[1][kk], a2 = w[2][kk], a3 = w[3][kk];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const float v = ck[j];
          z0[j] += a0 * v;
          z1[j] += a1 * v;
          z2[j] += a2 * v;
          z3[j] += a3 * v;
        }
      }
    }
    for (; ol < no; ++ol) {
      const int64_t o = o0 + ol;
      const float s = scale ? scale[o] : 1.f;
      float* __restrict zr = z + (c * zo + ol) * ldz;
      const float a = s * weight[(o * C + c) * KK];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) zr[j] = a * col[j];
      for (int64_t kk = 1; kk < KK; ++kk) {
        const float ak = s * weight[(o * C + c) * KK + kk];
        const float* __restrict ck = col + kk * ld;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) zr[j] += ak * ck[j];
      }
    }
  }
}

// im2col of all channels for a position range, in parallel over channels.
inline void im2col(const ConvGeom& g, const float* x, const PositionRange& pr, float* cols,
                   int64_t ld, const ParallelFor& pfor) {
  pfor(0, g.C, 1, [&](int64_t c0, int64_t c1) { im2col_channels(g, x, pr, c0, c1, cols, ld); });
}

// im2col of the channels list[0 .. n) into rows 0 .. n of cols (nothing when n == 0).
inline void im2col_list(const ConvGeom& g, const float* x, const PositionRange& pr,
                        const int32_t* list, int64_t n, float* cols, int64_t ld,
                        const ParallelFor& pfor) {
  if (n <= 0) return;
  pfor(0, n, 1,
       [&](int64_t c0, int64_t c1) { im2col_channels(g, x, pr, c0, c1, cols, ld, list); });
}

// SYRK: G += X X^T on the lower triangle, X is R rows of length L with leading dimension ld,
// G is R x R row-major float64. Columns are taken in chunks that fit in L2; within a chunk the
// 4x4 blocks of G are shared out among threads (each block has one owner, so the result does
// not depend on the thread count). Float partial sums per chunk, float64 across chunks.
void syrk_lower(const float* X, int64_t R, int64_t L, int64_t ld, double* G,
                const ParallelFor& pfor);

}  // namespace cpu
}  // namespace aofp
