// gram_forms on the CPU: forms[k, o] = sum over the channels c, d mask k keeps of grams[c, d, o],
// the Grams symmetric: only the upper triangle d >= c is read (diagonal + 2 x the rest).
// Work items are (tile of kOT output channels, block of kKB masks). Each item walks the channels
// c in blocks whose grams[c, :, tile] rows (cb x C x kOT floats) stay in cache while every mask
// of the item adds, for each of its channels c in the block, the rows of its channels d > c:
// |S|^2 / 2 vector adds per mask and tile instead of the C^2 multiply-adds of a dense product.
#include <algorithm>
#include <vector>

#include "kernels/cpu_common.h"

namespace aofp {
namespace cpu {

namespace {
constexpr int64_t kOT = 32;    // output channels per tile (the vector dimension)
constexpr int64_t kKB = 128;   // masks per work item

struct SetLists {
  std::vector<int32_t> idx;      // the channels of each set, ascending, set after set
  std::vector<int64_t> start;    // set k: idx[start[k], start[k + 1])
};

SetLists set_lists(const GramFormsParams& p) {
  SetLists l;
  l.start.resize(size_t(p.K + 1));
  for (int64_t k = 0; k < p.K; ++k) {
    l.start[size_t(k)] = int64_t(l.idx.size());
    const uint8_t* m = p.masks + k * p.C;
    for (int64_t c = 0; c < p.C; ++c)
      if (m[c]) l.idx.push_back(int32_t(c));
  }
  l.start[size_t(p.K)] = int64_t(l.idx.size());
  return l;
}

typedef float v8f __attribute__((vector_size(32)));   // 8 floats (two SSE halves without AVX)

AOFP_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// acc[0:8 NV] = sum over d in list of row[d * O + 0:8 NV], in NV registers.
template <int NV>
AOFP_INLINE void add_rows_v(const float* row, int64_t O, const int32_t* d, int64_t nd,
                            float* acc) {
  v8f a[NV] = {};
  for (int64_t i = 0; i < nd; ++i) {
    const float* r = row + int64_t(d[i]) * O;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[v] += load8(r + 8 * v);
  }
  std::memcpy(acc, a, sizeof(a));
}

// acc[0:n] = sum over d in list of row[d * O + 0:n], n <= kOT.
AOFP_INLINE void add_rows(const float* row, int64_t O, const int32_t* d, int64_t nd, int64_t n,
                          float* acc) {
  static_assert(kOT == 32, "at most four 8-float registers");
  const int64_t nv = n / 8;
  switch (nv) {
    case 4: add_rows_v<4>(row, O, d, nd, acc); break;
    case 3: add_rows_v<3>(row, O, d, nd, acc); break;
    case 2: add_rows_v<2>(row, O, d, nd, acc); break;
    case 1: add_rows_v<1>(row, O, d, nd, acc); break;
    default: break;
  }
  if (n == 8 * nv) return;
  float* tail = acc + 8 * nv;
  std::fill(tail, acc + n, 0.f);
  for (int64_t i = 0; i < nd; ++i) {
    const float* r = row + int64_t(d[i]) * O + 8 * nv;
    for (int64_t j = 0; j < n - 8 * nv; ++j) tail[j] += r[j];
  }
}

AOFP_HOT void forms_item(const GramFormsParams& p, const SetLists& l, int64_t o0, int64_t k0,
                         int64_t k1) {
  const int64_t C = p.C, O = p.O, n = std::min(kOT, O - o0);
  const int64_t cb = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, C * kOT));
  std::vector<double> dacc(size_t((k1 - k0) * kOT), 0.0);
  std::vector<int64_t> cur(l.start.begin() + k0, l.start.begin() + k1);   // next c of each set
  float facc[kOT];
  for (int64_t c0 = 0; c0 < C; c0 += cb) {
    const int64_t c1 = std::min(C, c0 + cb);
    for (int64_t k = k0; k < k1; ++k) {
      const int32_t* d = l.idx.data() + l.start[size_t(k)];
      const int64_t nd = l.start[size_t(k + 1)] - l.start[size_t(k)];
      int64_t& i = cur[size_t(k - k0)];
      double* acc = dacc.data() + (k - k0) * kOT;
      for (; i < l.start[size_t(k + 1)] && l.idx[size_t(i)] < c1; ++i) {
        // row c: its diagonal entry and twice the entries d > c of the set (the upper triangle)
        const int64_t c = l.idx[size_t(i)], after = i + 1 - l.start[size_t(k)];
        const float* row = p.grams + c * C * O + o0;
        add_rows(row, O, d + after, nd - after, n, facc);
        const float* diag = row + c * O;
        for (int64_t j = 0; j < n; ++j) acc[j] += 2.0 * double(facc[j]) + double(diag[j]);
      }
    }
  }
  for (int64_t k = k0; k < k1; ++k)
    std::copy(dacc.begin() + (k - k0) * kOT, dacc.begin() + (k - k0) * kOT + n,
              p.forms + k * O + o0);
}
}  // namespace

void gram_forms(const GramFormsParams& p, const ParallelFor& pfor) {
  if (p.K == 0 || p.O == 0) return;
  const SetLists l = set_lists(p);
  const int64_t nkb = ceil_div(p.K, kKB);
  pfor(0, ceil_div(p.O, kOT) * nkb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k0 = (i % nkb) * kKB;
      forms_item(p, l, (i / nkb) * kOT, k0, std::min(p.K, k0 + kKB));
    }
  });
}

}  // namespace cpu
}  // namespace aofp
