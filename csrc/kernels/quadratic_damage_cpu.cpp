// quadratic_damage on the CPU: damage[k] = r_k^T G r_k, r_k = 1 on the channels mask k removes.
// Per mask: sum over removed rows i of <G[i, :], r_k> (float dot over C, float64 across rows).
#include "kernels/cpu_common.h"

namespace aofp {
namespace cpu {

namespace {
AOFP_HOT void quadratic_rows(const QuadraticDamageParams& p, int64_t k0, int64_t k1) {
  const int64_t C = p.C;
  std::vector<float> r(static_cast<size_t>(C));
  for (int64_t k = k0; k < k1; ++k) {
    const uint8_t* m = p.masks + k * C;
    for (int64_t c = 0; c < C; ++c) r[size_t(c)] = m[c] ? 0.f : 1.f;
    double s = 0.0;
    for (int64_t i = 0; i < C; ++i) {
      if (m[i]) continue;
      const float* gi = p.gram + i * C;
      const float* rr = r.data();
      float t = 0.f;
#pragma omp simd reduction(+ : t)
      for (int64_t j = 0; j < C; ++j) t += gi[j] * rr[j];
      s += double(t);
    }
    p.damage[k] = float(s);
  }
}
}  // namespace

void quadratic_damage(const QuadraticDamageParams& p, const ParallelFor& pfor) {
  if (p.K == 0) return;
  pfor(0, p.K, 16, [&](int64_t k0, int64_t k1) { quadratic_rows(p, k0, k1); });
}

}  // namespace cpu
}  // namespace aofp
