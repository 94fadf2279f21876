// output_grams on the CPU: grams[c, d, o] = sum_t W[o, c, t] * sum_u blocks[c, d, t, u] W[o, d, u]
// for c <= d (the upper triangle); grams[d, c, o] is its mirror (the Grams are symmetric when the
// blocks are: blocks[t, u, c, d] = blocks[u, t, d, c]). Work items are (block of
// kOutputGramsBlock output channels, two rows c); for each row, every d >= c: the (c, d)
// T x T block (contiguous), then the bilinear form over the block's output channels (the vector
// dimension, kV at a time), with the T partial sums over u held in registers (3x3 and 1x1
// followers: T fixed at compile time). T^2 + T multiply-adds per (c, d >= c, o), float32.
#include <algorithm>
#include <cstring>

#include "kernels/cpu_common.h"

namespace aofp {
namespace cpu {

namespace {
constexpr int64_t kOB = kOutputGramsBlock;
constexpr int64_t kV = 8;    // output channels per register block (T + 1 AVX2 registers)
static_assert(kOB % kV == 0, "the output block is a whole number of register blocks");

// acc[0:kV] = the bilinear form for one (c, d) and kV output channels: s = the T x T block (row
// t, column u); wc, wd: rows t / u of kOB floats (the weight block of c and of d).
template <int TC>
AOFP_INLINE void pair_block(const float* s, const float* wc, const float* wd, int64_t T_,
                            float* acc) {
  const int64_t T = TC > 0 ? TC : T_;
  for (int64_t j = 0; j < kV; ++j) acc[j] = 0.f;
  if (TC > 0) {
    float tmp[TC > 0 ? TC : 1][kV] = {};
    for (int64_t u = 0; u < T; ++u) {
      const float* w = wd + u * kOB;
#pragma GCC unroll 16
      for (int64_t t = 0; t < T; ++t) {
        const float v = s[t * T + u];
#pragma omp simd
        for (int64_t j = 0; j < kV; ++j) tmp[t][j] += v * w[j];
      }
    }
#pragma GCC unroll 16
    for (int64_t t = 0; t < T; ++t) {
#pragma omp simd
      for (int64_t j = 0; j < kV; ++j) acc[j] += wc[t * kOB + j] * tmp[t][j];
    }
    return;
  }
  for (int64_t t = 0; t < T; ++t) {
    float tmp[kV] = {};
    for (int64_t u = 0; u < T; ++u) {
      const float v = s[t * T + u];
      const float* w = wd + u * kOB;
#pragma omp simd
      for (int64_t j = 0; j < kV; ++j) tmp[j] += v * w[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < kV; ++j) acc[j] += wc[t * kOB + j] * tmp[j];
  }
}

// pair_block for 16 output channels in one vector: every broadcast entry of the block feeds 16
// lanes instead of 8 (with 8, the broadcasts, one per multiply-add, bound the loop). Worth it
// where the vector is one AVX-512 register (grams_rows16).
template <int TC>
AOFP_INLINE v16f pair_block16(const float* s, const float* wc, const float* wd) {
  v16f tmp[TC] = {};
  for (int64_t u = 0; u < TC; ++u) {
    const v16f w = load16(wd + u * kOB);
#pragma GCC unroll 16
    for (int64_t t = 0; t < TC; ++t) tmp[t] += s[t * TC + u] * w;
  }
  v16f acc = {};
#pragma GCC unroll 16
  for (int64_t t = 0; t < TC; ++t) acc += load16(wc + t * kOB) * tmp[t];
  return acc;
}

// The row (c, d >= c) of one output block: each pair block computed once and written to both
// (c, d) and (d, c) (the per-output Grams are symmetric: the lower triangle is the mirror).
template <int TC, int W>
AOFP_INLINE void grams_row(const OutputGramsParams& p, int64_t ob, int64_t c) {
  const int64_t T = TC > 0 ? TC : p.T, C = p.C, O = p.O, TT = T * T, o0 = ob * kOB;
  const int64_t n = std::min<int64_t>(kOB, O - o0);
  const float* wblk = p.wt + ob * C * T * kOB;
  const float* wc = wblk + c * T * kOB;
  float acc[W];
  for (int64_t d = c; d < C; ++d) {
    const float* s = p.blocks + (c * C + d) * TT;
    const float* wd = wblk + d * T * kOB;
    float* out = p.grams + (c * C + d) * O + o0;
    for (int64_t o = 0; o < n; o += W) {
      if constexpr (W == 16) {
        const v16f v = pair_block16<TC>(s, wc + o, wd + o);
        std::memcpy(acc, &v, sizeof(v));
      } else {
        pair_block<TC>(s, wc + o, wd + o, T, acc);
      }
      std::copy(acc, acc + std::min<int64_t>(W, n - o), out + o);
    }
    if (d != c) std::copy(out, out + n, p.grams + (d * C + c) * O + o0);
  }
}

// The items [i0, i1), i = ob * H + h (H = ceil(C / 2)): rows c = h and C - 1 - h of output
// block ob, C + 1 pair blocks per item whatever h (rows of one channel alone would shrink
// from C to 1 and leave the threads' equal shares of items unequal in work).
template <int TC, int W>
AOFP_INLINE void rows_loop(const OutputGramsParams& p, int64_t i0, int64_t i1) {
  static_assert(kOB % W == 0, "the output block is a whole number of pair blocks");
  const int64_t C = p.C, H = ceil_div(C, 2);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t ob = i / H, h = i % H;
    grams_row<TC, W>(p, ob, h);
    if (C - 1 - h != h) grams_row<TC, W>(p, ob, C - 1 - h);
  }
}

template <int TC>
AOFP_HOT void grams_rows(const OutputGramsParams& p, int64_t i0, int64_t i1) {
  rows_loop<TC, kV>(p, i0, i1);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(AOFP_NO_CLONES)
// 16 output channels per AVX-512 register (the caller checks the CPU).
template <int TC>
__attribute__((target("arch=x86-64-v4"))) void grams_rows16(const OutputGramsParams& p,
                                                           int64_t i0, int64_t i1) {
  rows_loop<TC, 16>(p, i0, i1);
}

bool wide_cpu() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}
#else
template <int TC>
void grams_rows16(const OutputGramsParams& p, int64_t i0, int64_t i1) {
  grams_rows<TC>(p, i0, i1);
}

bool wide_cpu() { return false; }
#endif
}  // namespace

void output_grams(const OutputGramsParams& p, const ParallelFor& pfor) {
  if (p.C == 0 || p.O == 0) return;
  const bool wide = (p.T == 9 || p.T == 1) && wide_cpu();
  pfor(0, ceil_div(p.O, kOB) * ceil_div(p.C, 2), 1, [&](int64_t i0, int64_t i1) {
    if (p.T == 9) {
      wide ? grams_rows16<9>(p, i0, i1) : grams_rows<9>(p, i0, i1);
    } else if (p.T == 1) {
      wide ? grams_rows16<1>(p, i0, i1) : grams_rows<1>(p, i0, i1);
    } else {
      grams_rows<0>(p, i0, i1);
    }
  });
}

}  // namespace cpu
}  // namespace aofp
