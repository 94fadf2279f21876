// output_grams on the CPU: grams[c, d, o] = sum_t W[o, c, t] * sum_u blocks[c, d, t, u] W[o, d, u].
// Work items are (block of kOutputGramsBlock output channels, c); for each, every d: the (c, d)
// T x T block (contiguous), then the bilinear form over the block's output channels (the vector
// dimension, kV at a time), with the T partial sums over u held in registers (3x3 and 1x1
// followers: T fixed at compile time). T^2 + T multiply-adds per (c, d, o), float32.
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

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(AOFP_NO_CLONES)
#define AOFP_WIDE 1
typedef float v16f __attribute__((vector_size(64)));   // one AVX-512 register

AOFP_INLINE v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// pair_block for 16 output channels in one register each: every broadcast entry of the block
// feeds 16 lanes instead of 8 (with 8, the broadcasts, one per multiply-add, bound the loop).
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

// grams_rows for T = TC on AVX-512 (the caller checks the CPU): 16 output channels at a time.
template <int TC>
__attribute__((target("arch=x86-64-v4"))) void grams_rows16(const OutputGramsParams& p,
                                                           int64_t i0, int64_t i1) {
  const int64_t C = p.C, O = p.O, TT = TC * TC;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t c = i % C, ob = i / C, o0 = ob * kOB;
    const float* wblk = p.wt + ob * C * TC * kOB;
    const float* wc = wblk + c * TC * kOB;
    for (int64_t d = 0; d < C; ++d) {
      const float* s = p.blocks + (c * C + d) * TT;
      const float* wd = wblk + d * TC * kOB;
      float* out = p.grams + (c * C + d) * O;
      for (int64_t o = 0; o < kOB && o0 + o < O; o += 16) {
        const v16f acc = pair_block16<TC>(s, wc + o, wd + o);
        const int64_t n = std::min<int64_t>(16, O - o0 - o);
        if (n == 16) {
          std::memcpy(out + o0 + o, &acc, sizeof(acc));
        } else {
          for (int64_t j = 0; j < n; ++j) out[o0 + o + j] = acc[j];
        }
      }
    }
  }
}
#endif

// The (output block, c) items [i0, i1), i = ob * C + c.
template <int TC>
AOFP_HOT void grams_rows(const OutputGramsParams& p, int64_t i0, int64_t i1) {
  const int64_t T = p.T, C = p.C, O = p.O, TT = T * T;
  float acc[kV];
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t c = i % C, ob = i / C, o0 = ob * kOB;
    const float* wblk = p.wt + ob * C * T * kOB;
    const float* wc = wblk + c * T * kOB;
    for (int64_t d = 0; d < C; ++d) {
      const float* s = p.blocks + (c * C + d) * TT;
      const float* wd = wblk + d * T * kOB;
      float* out = p.grams + (c * C + d) * O;
      for (int64_t o = 0; o < kOB && o0 + o < O; o += kV) {
        pair_block<TC>(s, wc + o, wd + o, T, acc);
        std::copy(acc, acc + std::min(kV, O - o0 - o), out + o0 + o);
      }
    }
  }
}
}  // namespace

void output_grams(const OutputGramsParams& p, const ParallelFor& pfor) {
  if (p.C == 0 || p.O == 0) return;
#ifdef AOFP_WIDE
  static_assert(kOB % 16 == 0, "the output block is a whole number of 16-float registers");
  if ((p.T == 9 || p.T == 1) && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq")) {
    pfor(0, ceil_div(p.O, kOB) * p.C, 1, [&](int64_t i0, int64_t i1) {
      if (p.T == 9) {
        grams_rows16<9>(p, i0, i1);
      } else {
        grams_rows16<1>(p, i0, i1);
      }
    });
    return;
  }
#endif
  pfor(0, ceil_div(p.O, kOB) * p.C, 1, [&](int64_t i0, int64_t i1) {
    if (p.T == 9) {
      grams_rows<9>(p, i0, i1);
    } else if (p.T == 1) {
      grams_rows<1>(p, i0, i1);
    } else {
      grams_rows<0>(p, i0, i1);
    }
  });
}

}  // namespace cpu
}  // namespace aofp
