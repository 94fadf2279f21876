#include "kernels/cpu_common.h"

namespace aofp {

void serial_for(int64_t begin, int64_t end, int64_t /*grain*/,
                const std::function<void(int64_t, int64_t)>& body) {
  if (begin < end) body(begin, end);
}

namespace cpu {

namespace {
constexpr int64_t kSyrkChunk = 4096;  // columns per chunk of X kept in cache
constexpr int64_t kFloatRun = 512;    // columns per float partial sum (float64 across)

AOFP_INLINE void dot4x4(const float* const* a, const float* const* b, int64_t n, float* out) {
  float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  float s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
  for (int64_t l = 0; l < n; ++l) {
    const float x0 = a0[l], x1 = a1[l], x2 = a2[l], x3 = a3[l];
    const float y0 = b0[l], y1 = b1[l], y2 = b2[l], y3 = b3[l];
    s00 += x0 * y0; s01 += x0 * y1; s02 += x0 * y2; s03 += x0 * y3;
    s10 += x1 * y0; s11 += x1 * y1; s12 += x1 * y2; s13 += x1 * y3;
    s20 += x2 * y0; s21 += x2 * y1; s22 += x2 * y2; s23 += x2 * y3;
    s30 += x3 * y0; s31 += x3 * y1; s32 += x3 * y2; s33 += x3 * y3;
  }
  out[0] = s00; out[1] = s01; out[2] = s02; out[3] = s03;
  out[4] = s10; out[5] = s11; out[6] = s12; out[7] = s13;
  out[8] = s20; out[9] = s21; out[10] = s22; out[11] = s23;
  out[12] = s30; out[13] = s31; out[14] = s32; out[15] = s33;
}

AOFP_INLINE float dot1(const float* a, const float* b, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t l = 0; l < n; ++l) s += a[l] * b[l];
  return s;
}
}  // namespace

// The 4x4 blocks (ib, jb), jb <= ib, of rows [0, R), in a fixed order.
AOFP_HOT void syrk_blocks(const float* X, int64_t R, int64_t ld, int64_t l0, int64_t ln,
                          const int32_t* pairs, int64_t p0, int64_t p1, double* G) {
  for (int64_t q = p0; q < p1; ++q) {
    const int64_t ib = int64_t(pairs[2 * q]) * 4, jb = int64_t(pairs[2 * q + 1]) * 4;
    const int64_t ni = std::min<int64_t>(4, R - ib), nj = std::min<int64_t>(4, R - jb);
    double acc[16] = {0};
    for (int64_t m0 = l0; m0 < l0 + ln; m0 += kFloatRun) {
      const int64_t mn = std::min(kFloatRun, l0 + ln - m0);
      float s[16];
      if (ni == 4 && nj == 4) {
        const float* a[4] = {X + ib * ld + m0, X + (ib + 1) * ld + m0, X + (ib + 2) * ld + m0,
                             X + (ib + 3) * ld + m0};
        const float* b[4] = {X + jb * ld + m0, X + (jb + 1) * ld + m0, X + (jb + 2) * ld + m0,
                             X + (jb + 3) * ld + m0};
        dot4x4(a, b, mn, s);
      } else {
        for (int64_t u = 0; u < ni; ++u)
          for (int64_t v = 0; v < nj; ++v)
            s[u * 4 + v] = dot1(X + (ib + u) * ld + m0, X + (jb + v) * ld + m0, mn);
      }
      for (int i = 0; i < 16; ++i) acc[i] += double(s[i]);
    }
    for (int64_t u = 0; u < ni; ++u)
      for (int64_t v = 0; v < nj; ++v)
        if (jb + v <= ib + u) G[(ib + u) * R + (jb + v)] += acc[u * 4 + v];
  }
}

void syrk_lower(const float* X, int64_t R, int64_t L, int64_t ld, double* G,
                const ParallelFor& pfor) {
  if (R == 0 || L == 0) return;
  const int64_t nb = ceil_div(R, 4);
  std::vector<int32_t> pairs;
  pairs.reserve(size_t(nb * (nb + 1)));
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      pairs.push_back(int32_t(i));
      pairs.push_back(int32_t(j));
    }
  const int64_t npairs = int64_t(pairs.size() / 2);
  // A chunk of all R rows stays within about 256 KiB.
  int64_t w = std::max<int64_t>(16, std::min<int64_t>(kSyrkChunk, (int64_t(1) << 16) / R));
  w -= w % 16;
  for (int64_t l0 = 0; l0 < L; l0 += w) {
    const int64_t ln = std::min(w, L - l0);
    pfor(0, npairs, 1, [&](int64_t p0, int64_t p1) {
      syrk_blocks(X, R, ld, l0, ln, pairs.data(), p0, p1, G);
    });
  }
}

}  // namespace cpu
}  // namespace aofp
