// gram_forms on the CPU: forms[k, o] = sum over the channels c, d mask k keeps of grams[c, d, o],
// the Grams symmetric: only the upper triangle d >= c is read (diagonal + 2 x the rest).
// Work items are (tile of kOT output channels, block of kKB masks). Each item walks the channels
// c, packs the tile's rows grams[c, d >= c, tile] into one contiguous buffer, and every mask of
// the item that keeps c adds the rows of its channels d > c from it: |S|^2 / 2 vector adds per
// mask and tile instead of the C^2 multiply-adds of a dense product.
#include <algorithm>
#include <vector>

#include "kernels/cpu_common.h"

namespace aofp {
namespace cpu {

namespace {
constexpr int64_t kOT = 32;    // output channels per tile (the vector dimension)
static_assert(kOT % 16 == 0, "the tile is a whole number of 16-float vectors");
constexpr int64_t kKB = 1024;  // masks per work item at most (each item packs its rows once)
constexpr int64_t kMinItems = 8;    // work items wanted for the threads
constexpr int64_t kMinMasks = 128;  // masks per item at least (packing is paid per item)

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

constexpr int kNV = int(kOT / 16);   // 16-float vectors (cpu_common.h) per tile

// acc[0:kOT] = sum over d in list of rows[d * kOT + 0:kOT] (a packed row block, zero past the
// tile's outputs), in 2 kNV registers: two rows per iteration into two sets of sums (one set is
// a chain of dependent adds, bound by the add's latency; the compiler may not reassociate float
// adds itself).
AOFP_INLINE void add_rows(const float* rows, const int32_t* d, int64_t nd, float* acc) {
  v16f a[kNV] = {}, b[kNV] = {};
  int64_t i = 0;
  for (; i + 1 < nd; i += 2) {
    const float* r0 = rows + int64_t(d[i]) * kOT;
    const float* r1 = rows + int64_t(d[i + 1]) * kOT;
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) {
      a[v] += load16(r0 + 16 * v);
      b[v] += load16(r1 + 16 * v);
    }
  }
  if (i < nd) {
    const float* r = rows + int64_t(d[i]) * kOT;
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) a[v] += load16(r + 16 * v);
  }
#pragma GCC unroll 4
  for (int v = 0; v < kNV; ++v) a[v] += b[v];
  std::memcpy(acc, a, sizeof(a));
}

AOFP_HOT void forms_item(const GramFormsParams& p, const SetLists& l, int64_t o0, int64_t k0,
                         int64_t k1) {
  const int64_t C = p.C, O = p.O, n = std::min(kOT, O - o0);
  std::vector<double> dacc(size_t((k1 - k0) * kOT), 0.0);
  std::vector<int64_t> cur(l.start.begin() + k0, l.start.begin() + k1);   // next c of each set
  // row c of the tile, packed: buf[d * kOT + j] = grams[c, d, o0 + j] (C x kOT floats, 32 KB
  // at C = 256). Read in place, the rows d are O floats apart: at a power-of-two O they fall in
  // a few cache sets and evict each other, and every mask's sum ran at the L2's rate.
  // 64-byte aligned: each row is whole 16-float vectors, and a vector load across two cache
  // lines costs two (the allocator's 16-byte alignment split three rows in four)
  std::vector<float> store(size_t(C * kOT + 16), 0.f);
  float* const buf = align64(store.data());
  float facc[kOT];
  for (int64_t c = 0; c < C; ++c) {
    bool packed = false;
    for (int64_t k = k0; k < k1; ++k) {
      int64_t& i = cur[size_t(k - k0)];
      if (i == l.start[size_t(k + 1)] || l.idx[size_t(i)] != c) continue;   // c not in set k
      if (!packed) {
        const float* src = p.grams + c * C * O + o0;
        for (int64_t d = c; d < C; ++d) std::copy(src + d * O, src + d * O + n, buf + d * kOT);
        packed = true;
      }
      // row c: its diagonal entry and twice the entries d > c of the set (the upper triangle)
      const int32_t* d = l.idx.data() + l.start[size_t(k)];
      const int64_t nd = l.start[size_t(k + 1)] - l.start[size_t(k)];
      const int64_t after = i + 1 - l.start[size_t(k)];
      add_rows(buf, d + after, nd - after, facc);
      double* acc = dacc.data() + (k - k0) * kOT;
      const float* diag = buf + c * kOT;
      for (int64_t j = 0; j < n; ++j) acc[j] += 2.0 * double(facc[j]) + double(diag[j]);
      ++i;
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
  // the masks in blocks of at most kKB, and in at least kMinItems items overall where that
  // leaves kMinMasks or more per block (few tiles, e.g. 32 outputs per call: else one thread)
  const int64_t tiles = ceil_div(p.O, kOT);
  const int64_t nkb = std::max(ceil_div(p.K, kKB),
                               std::min(ceil_div(kMinItems, tiles), ceil_div(p.K, kMinMasks)));
  const int64_t kb = ceil_div(p.K, nkb);
  pfor(0, tiles * nkb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k0 = (i % nkb) * kb;
      if (k0 < p.K) forms_item(p, l, (i / nkb) * kOT, k0, std::min(p.K, k0 + kb));
    }
  });
}

}  // namespace cpu
}  // namespace aofp
