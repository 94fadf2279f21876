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

// The output positions [q0, q0 + n) of the follower, flattened over (n, ho, wo), as im2col rows:
// cols[(c * KH*KW + kk) * ld + j] = x[n, c, ih, iw] (0 outside the input), for c in [c0, c1).
struct PositionRange {
  int64_t q0 = 0, n = 0;
  std::vector<int64_t> xoff;   // per position: n * xs[0]
  std::vector<int64_t> ih0;    // per position: ho * stride_h - pad_h
  std::vector<int64_t> iw0;    // per position: wo * stride_w - pad_w

  void set(const ConvGeom& g, int64_t q_begin, int64_t count) {
    q0 = q_begin;
    n = count;
    xoff.resize(count);
    ih0.resize(count);
    iw0.resize(count);
    const int64_t hw = g.HO * g.WO;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t q = q_begin + j;
      const int64_t nn = q / hw, r = q % hw;
      xoff[j] = nn * g.xs[0];
      ih0[j] = (r / g.WO) * g.stride_h - g.pad_h;
      iw0[j] = (r % g.WO) * g.stride_w - g.pad_w;
    }
  }
};

inline void im2col_channels(const ConvGeom& g, const float* x, const PositionRange& pr,
                            int64_t c0, int64_t c1, float* cols, int64_t ld) {
  const int64_t KK = g.taps();
  for (int64_t c = c0; c < c1; ++c) {
    const float* xc = x + c * g.xs[1];
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        float* row = cols + (c * KK + kh * g.KW + kw) * ld;
        const int64_t dh = kh * g.dil_h, dw = kw * g.dil_w;
        for (int64_t j = 0; j < pr.n; ++j) {
          const int64_t ih = pr.ih0[j] + dh, iw = pr.iw0[j] + dw;
          row[j] = (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
                       ? xc[pr.xoff[j] + ih * g.xs[2] + iw * g.xs[3]]
                       : 0.0f;
        }
      }
    }
  }
}

// im2col of all channels for a position range, in parallel over channels.
inline void im2col(const ConvGeom& g, const float* x, const PositionRange& pr, float* cols,
                   int64_t ld, const ParallelFor& pfor) {
  pfor(0, g.C, 1, [&](int64_t c0, int64_t c1) { im2col_channels(g, x, pr, c0, c1, cols, ld); });
}

// SYRK on rows of X: G[i][j] += sum_l X[i][l] * X[j][l] for i >= j in the rows [i0, i1),
// X is R rows of length L with leading dimension ld. Float partial sums over chunks of
// at most 512 columns, accumulated into double G (R x R, row-major, lower triangle).
void syrk_lower_rows(const float* X, int64_t R, int64_t L, int64_t ld, int64_t i0, int64_t i1,
                     double* G);

// Full SYRK over all rows in parallel (deterministic: each G entry has one owner).
inline void syrk_lower(const float* X, int64_t R, int64_t L, int64_t ld, double* G,
                       const ParallelFor& pfor) {
  // Rows are handed out in blocks of 4; later rows have more work, so use a small grain.
  const int64_t nblk = ceil_div(R, 4);
  pfor(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    syrk_lower_rows(X, R, L, ld, b0 * 4, std::min(R, b1 * 4), G);
  });
}

}  // namespace cpu
}  // namespace aofp
