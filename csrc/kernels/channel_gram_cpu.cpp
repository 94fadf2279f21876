// channel_gram on the CPU: G[c, c'] = sum over (n, o, p) of scale[o]^2 z_c z_c'.
//
// Two exact ways, chosen by cost:
//  - direct: per tile of positions, the contributions Z (C x O*n, scaled by scale[o]) and a
//    symmetric rank-k update G += Z Z^T; cost C*O*KK*P + C^2*O*P / 2.
//  - factored: with the im2col rows X[(c, kk)] and Wt[(c, kk)][o] = scale[o] W[o, c, kk],
//    G[c, c'] = sum_{kk, kk'} (X X^T)[(c,kk), (c',kk')] * (Wt Wt^T)[(c,kk), (c',kk')];
//    cost (C*KK)^2 * (P + O) / 2. It wins for Linear followers (KK = 1, G = (X^T X) o (W^T W))
//    and for wide followers; it needs (C*KK)^2 doubles, so it is used only when that is small.
#include "kernels/cpu_common.h"

namespace aofp {
namespace cpu {

namespace {
constexpr int64_t kZBudget = int64_t(1) << 18;        // floats of Z per tile (1 MiB, in L2)
constexpr int64_t kColsBudget = int64_t(1) << 20;     // floats of im2col per chunk (4 MiB)
constexpr int64_t kFactoredMax = int64_t(1) << 23;    // (C*KK)^2 doubles (64 MiB)

// Rows c in [c0, c1) of Z for positions [j0, j0 + n) of the chunk, scaled by scale[o]:
// z[c][o * n + j] (row c packs all output channels).
AOFP_HOT void gram_z(const ChannelGramParams& p, const float* cols, int64_t ld, int64_t j0,
                     int64_t n, int64_t c0, int64_t c1, float* z) {
  const ConvGeom& g = p.g;
  contributions(p.weight, p.scale, g.C, g.taps(), cols, ld, j0, n, 0, g.O, c0, c1, z, g.O, n);
}

void fill_symmetric(double* G, int64_t R) {
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = i + 1; j < R; ++j) G[i * R + j] = G[j * R + i];
}
}  // namespace

void channel_gram(const ChannelGramParams& p, const ParallelFor& pfor) {
  const ConvGeom& g = p.g;
  const int64_t C = g.C, O = g.O, KK = g.taps(), P = g.positions();
  const int64_t CK = C * KK;
  std::vector<double> G(size_t(C * C), 0.0);
  auto finish = [&]() {
    for (int64_t i = 0; i < C * C; ++i) p.gram[i] = float(G[size_t(i)]);
  };
  if (C == 0) return;
  if (P == 0 || O == 0) return finish();

  const double direct = double(C) * O * KK * P + 0.5 * double(C) * C * O * P;
  const double factored = 0.5 * double(CK) * CK * double(P + O) + double(C) * C * KK * KK;
  const bool use_factored = CK * CK <= kFactoredMax && factored < direct;

  const int64_t P_chunk = std::min(P, std::max<int64_t>(1, kColsBudget / std::max<int64_t>(1, CK)));
  std::vector<float> cols(size_t(CK) * size_t(P_chunk));
  PositionRange pr;

  if (use_factored) {
    std::vector<double> A(size_t(CK * CK), 0.0), M(size_t(CK * CK), 0.0);
    for (int64_t q0 = 0; q0 < P; q0 += P_chunk) {
      const int64_t nq = std::min(P_chunk, P - q0);
      pr.set(g, q0, nq);
      im2col(g, p.x, pr, cols.data(), P_chunk, pfor);
      syrk_lower(cols.data(), CK, nq, P_chunk, A.data(), pfor);
    }
    std::vector<float> wt(static_cast<size_t>(CK * O));
    for (int64_t o = 0; o < O; ++o) {
      const float s = p.scale ? p.scale[o] : 1.f;
      for (int64_t r = 0; r < CK; ++r) wt[size_t(r * O + o)] = s * p.weight[o * CK + r];
    }
    syrk_lower(wt.data(), CK, O, O, M.data(), pfor);
    fill_symmetric(A.data(), CK);
    fill_symmetric(M.data(), CK);
    pfor(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t c2 = 0; c2 <= c; ++c2) {
          double s = 0.0;
          for (int64_t k1 = 0; k1 < KK; ++k1) {
            const size_t row = size_t((c * KK + k1) * CK + c2 * KK);
            for (int64_t k2 = 0; k2 < KK; ++k2) s += A[row + size_t(k2)] * M[row + size_t(k2)];
          }
          G[size_t(c * C + c2)] = s;
        }
      }
    });
  } else {
    const int64_t P_t = std::min(P_chunk, std::max<int64_t>(1, kZBudget / (C * O)));
    std::vector<float> z(size_t(C * O) * size_t(P_t));
    for (int64_t q0 = 0; q0 < P; q0 += P_chunk) {
      const int64_t nq = std::min(P_chunk, P - q0);
      pr.set(g, q0, nq);
      im2col(g, p.x, pr, cols.data(), P_chunk, pfor);
      for (int64_t j0 = 0; j0 < nq; j0 += P_t) {
        const int64_t n = std::min(P_t, nq - j0);
        const int64_t L = O * n;  // row c of Z: (o, j) packed
        pfor(0, C, 1, [&](int64_t c0, int64_t c1) {
          gram_z(p, cols.data(), P_chunk, j0, n, c0, c1, z.data());
        });
        syrk_lower(z.data(), C, L, L, G.data(), pfor);
      }
    }
  }
  fill_symmetric(G.data(), C);
  finish();
}

}  // namespace cpu
}  // namespace aofp
