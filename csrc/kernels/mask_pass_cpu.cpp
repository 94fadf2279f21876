// The mask pass of masked_damage on the CPU: for every mask k and output channel o, one
// reduction over the positions of d_k = sum of z_c over the channels c that mask k removes
// (z_c = conv(x[:, c], W[:, c]), so the masked output is y - d_k), with the epilogue of
// mask_pass.h: sum d^2 (norm none/affine), the clipped damage (ReLU) or BN statistics.
//
// Blocking (docs/kernels.md, "The mask pass"): a task owns 4 output channels; per tile of
// 32 positions it forms each input channel's contributions z_c in registers (the 4 outputs
// share every im2col load; the taps are summed before anything is stored), adds them into y
// and, for the channels every mask removes, into one sum `gone` that starts every d_k. Only
// the channels that some but not all masks remove ("varying") are stored, and only they enter
// the subset tables (method of the four Russians: groups of b channels, 2^b subset sums each;
// d_k is then one table row per group instead of one row per channel). The masks are summed
// from the tables in blocks of 128 whose partial sums d stay in L1, group chunk by group chunk
// (each chunk's tables built into one L1 buffer right before the masks read them), four masks
// at a time with their eight 16-float partial sums in registers, and the epilogue reduces each
// (k, o) row of 32 at once. No masked output is stored: memory is bounded by the tile.
//
// Accumulation: a row of 32 positions is reduced in float32, rows are accumulated in float64
// per (k, o) (BN statistics: sums of data shifted by their first tile's means, so no sum of
// squares loses its precision to a large mean; see Stats).
#include <cmath>
#include <limits>

#include "kernels/cpu_common.h"
#include "kernels/mask_pass.h"

namespace aofp {
namespace cpu {

namespace {

constexpr int64_t kLanes = 32;                     // positions per tile (two 16-float vectors)
constexpr int64_t kOutBlock = 4;                   // output channels per task
constexpr int64_t kMaskBlock = 128;                // masks per block of partial sums d (16 KiB)
constexpr int64_t kChunkFloats = 6 * 1024;         // tables of one group chunk (24 KiB, L1)
constexpr int64_t kColsBudget = int64_t(1) << 17;  // floats of im2col per chunk (512 KiB, L2)

// The masks' structure, shared by every task.
struct MaskPlan {
  std::vector<int8_t> role;       // per channel: 0 kept by every mask, 1 removed by every mask,
                                  // 2 varying (its index among the varying ones in `slot`)
  std::vector<int32_t> slot;      // per channel: index among the varying channels
  std::vector<int32_t> used;      // the channels whose contributions the pass forms: every
                                  // channel where y must be summed, else the roles 1 and 2
  std::vector<uint8_t> removes;   // per mask: removes at least one channel
  int64_t Cv = 0;                 // varying channels
  int bits = 1;
  int64_t entries = 2, ngroups = 0, chunk = 1;  // 2^bits, ceil(Cv / bits), groups per chunk
  std::vector<uint16_t> codes;    // (ceil(K / 4), ngroups, 4): offset of mask k's entry in
                                  // group g's table, at ((k / 4) * ngroups + g) * 4 + k % 4;
                                  // 0 (the empty subset) past the last mask
};

// Per output and tile, a group costs 2^b row stores for its table in each block of masks and
// K row loads for the masks (two per cycle); each chunk of groups reads and writes the masks'
// partial sums once.
double table_cost(int64_t K, int64_t Cv, int b) {
  const int64_t groups = ceil_div(std::max<int64_t>(Cv, 1), b);
  const int64_t chunk = std::max<int64_t>(1, kChunkFloats / ((int64_t(1) << b) * kLanes));
  return double(groups) * (double(int64_t(1) << b) * double(ceil_div(K, kMaskBlock)) +
                           0.5 * double(K)) +
         double(ceil_div(groups, chunk)) * double(K);
}

int table_bits(int64_t K, int64_t Cv) {
  int best = 1;
  double best_cost = std::numeric_limits<double>::infinity();
  for (int b = 1; b <= 6 && (b == 1 || b <= Cv); ++b) {
    const double cost = table_cost(K, Cv, b);
    if (cost < best_cost) {
      best_cost = cost;
      best = b;
    }
  }
  return best;
}

// Channel c of x is 0 at every position and its weights are finite: its contributions are
// exactly 0 (a base-masked input channel), so removing it changes nothing.
bool silent(const MaskedDamageParams& p, int64_t c) {
  const ConvGeom& g = p.g;
  const int64_t KK = g.taps();
  for (int64_t o = 0; o < g.O; ++o)
    for (int64_t t = 0; t < KK; ++t)
      if (!std::isfinite(p.weight[(o * g.C + c) * KK + t])) return false;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t h = 0; h < g.H; ++h)
      for (int64_t w = 0; w < g.W; ++w)
        if (p.x[n * g.xs[0] + c * g.xs[1] + h * g.xs[2] + w * g.xs[3]] != 0.f) return false;
  return true;
}

// sum_y: the epilogue needs y and p.y is not given, so every channel's contributions are
// summed; otherwise the channels every mask keeps (and the all-removed silent ones) are skipped.
MaskPlan plan_masks(const MaskedDamageParams& p, bool sum_y) {
  const uint8_t* masks = p.masks;
  const int64_t K = p.K, C = p.g.C;
  MaskPlan mp;
  std::vector<int64_t> removed(size_t(C), 0);
  mp.removes.assign(size_t(K), 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c)
      if (!masks[k * C + c]) {
        ++removed[size_t(c)];
        mp.removes[size_t(k)] = 1;
      }
  mp.role.assign(size_t(C), 0);
  mp.slot.assign(size_t(C), -1);
  for (int64_t c = 0; c < C; ++c) {
    if (removed[size_t(c)] == K) {
      mp.role[size_t(c)] = silent(p, c) ? 0 : 1;
    } else if (removed[size_t(c)] > 0) {
      mp.role[size_t(c)] = 2;
      mp.slot[size_t(c)] = int32_t(mp.Cv++);
    }
    if (sum_y || mp.role[size_t(c)] != 0) mp.used.push_back(int32_t(c));
  }
  mp.bits = table_bits(K, mp.Cv);
  mp.entries = int64_t(1) << mp.bits;
  mp.ngroups = ceil_div(mp.Cv, mp.bits);
  mp.chunk = std::max<int64_t>(1, kChunkFloats / (mp.entries * kLanes));
  mp.codes.assign(size_t(ceil_div(K, 4) * 4 * mp.ngroups), 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c)
      if (mp.role[size_t(c)] == 2 && !masks[k * C + c]) {
        const int64_t v = mp.slot[size_t(c)], grp = v / mp.bits;
        mp.codes[size_t(((k / 4) * mp.ngroups + grp) * 4 + k % 4)] +=
            uint16_t((int64_t(1) << (v % mp.bits)) * kLanes);  // < 2^8 * 32
      }
  return mp;
}

// BnStats works on shifted data: per (k, o) the sums over positions of a = d - sd,
// a^2, f a and of b = f - a - sb, b^2, with f = y - sy; the shifts sy (per o), sd and sb (per
// (k, o)) are the means over the first tile of each output, close to the true means, so the
// centred moments taken from these sums at the end (stats_moments) lose nothing to a large
// mean (a test offsets the activations by 1000).
struct Stats {
  std::vector<float> shift;    // (O, K, 2): sd, sb
  std::vector<double> sums;    // (O, K, 5): sum a, sum a^2, sum f a, sum b, sum b^2
  std::vector<float> yshift;   // (O): sy
  std::vector<double> ysums;   // (O, 2): sum f, sum f^2
};

struct Ctx {
  const MaskedDamageParams* p;
  const MaskPassArgs* a;
  const MaskPlan* mp;
  const float* wp;     // pack_weights
  const float* cols;   // im2col of the current chunk, rows of ld floats
  int64_t ld;
  int64_t q0;          // the chunk's first position
  Stats* stats;        // BnStats: the shifted sums (each task updates its own outputs')
  // Output-major (O, K) copies, so an output's K entries are contiguous in the epilogues:
  double* acc;         // Square / Relu: the damage sums
  const float* A;      // Relu: the masks' slopes, or nullptr
  const float* B;      // Relu: the masks' offsets, or nullptr
};

struct Scratch {             // rows of kLanes floats, each starting on a cache line
  AlignedFloats z;           // (Cv, kOutBlock, kLanes) contributions of the varying channels
  AlignedFloats w;            // (kOutBlock, kLanes) y + bias - centre
  AlignedFloats gone;        // (kOutBlock, kLanes) contributions of the all-removed channels
  AlignedFloats base;        // (kOutBlock, kLanes) Relu: relu(a w + b)
  AlignedFloats tab;         // (chunk, 2^b, kLanes); entry 0 of every group stays zero
  AlignedFloats d;           // (kMaskBlock, kLanes) partial sums of the masks
};

AOFP_INLINE v16f relu16(v16f v) {
  const v16f zero = {};
  return v < zero ? zero : v;  // NaN stays NaN
}

typedef int32_t v16i __attribute__((vector_size(64)));

// The lane sums of four vectors, {sum a, sum b, sum c, sum e}, by a transposing tree of
// shuffles and adds (12 vector operations instead of four chains of 15 scalar adds).
AOFP_INLINE void sum4x16(v16f a, v16f b, v16f c, v16f e, float* out) {
  const v16i lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const v16i hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const v16f ab = __builtin_shuffle(a, b, lo8) + __builtin_shuffle(a, b, hi8);
  const v16f ce = __builtin_shuffle(c, e, lo8) + __builtin_shuffle(c, e, hi8);
  const v16i lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const v16i hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const v16f q = __builtin_shuffle(ab, ce, lo4) + __builtin_shuffle(ab, ce, hi4);
  const v16i lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13};
  const v16i hi2 = {2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15};
  const v16f t = __builtin_shuffle(q, lo2) + __builtin_shuffle(q, hi2);
  const v16i ev = {0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6};
  const v16i od = {1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7};
  const v16f r = __builtin_shuffle(t, ev) + __builtin_shuffle(t, od);
  out[0] = r[0];
  out[1] = r[1];
  out[2] = r[2];
  out[3] = r[3];
}

// The tile's valid lanes: lanes [0, 16) and [16, 32) below n.
struct Lanes {
  v16i v0, v1;
  explicit Lanes(int64_t n) {
    const v16i idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    v0 = idx < int32_t(n);
    v1 = idx + 16 < int32_t(n);
  }
};

AOFP_INLINE v16f keep(v16i m, v16f v) {  // v where m, else 0 (also where v is NaN)
  const v16f zero = {};
  return m ? v : zero;
}

// (K, O) -> (O, K).
std::vector<float> transposed(const float* v, int64_t K, int64_t O) {
  std::vector<float> t(size_t(K * O));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t o = 0; o < O; ++o) t[size_t(o * K + k)] = v[k * O + o];
  return t;
}

// W[o, c, t] of the used channels c = used[i] as wp[((o / 4 * Cu + i) * taps + t) * 4 + o % 4],
// zero past the last output.
std::vector<float> pack_weights(const MaskedDamageParams& p, const std::vector<int32_t>& used) {
  const int64_t C = p.g.C, KK = p.g.taps(), O = p.g.O, nb = ceil_div(O, kOutBlock);
  const int64_t Cu = int64_t(used.size());
  std::vector<float> wp(size_t(nb * Cu * KK * kOutBlock), 0.f);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < Cu; ++i)
      for (int64_t t = 0; t < KK; ++t)
        wp[size_t((((o / kOutBlock) * Cu + i) * KK + t) * kOutBlock + o % kOutBlock)] =
            p.weight[(o * C + used[size_t(i)]) * KK + t];
  return wp;
}

// The contributions of one tile (outputs [o0, o0 + 4), positions [j0, j0 + kLanes) of the
// chunk): stores z of the varying channels; y (without bias: summed here over every channel,
// or read from p.y) and the sum over the all-removed channels come back.
AOFP_INLINE void tile_contributions(const Ctx& cx, int64_t o0, int64_t j0, float* __restrict z,
                                    v16f (&y)[kOutBlock][2], v16f (&gone)[kOutBlock][2]) {
  const MaskPlan& mp = *cx.mp;
  const int64_t KK = cx.p->g.taps(), ld = cx.ld, Cu = int64_t(mp.used.size());
  const float* __restrict wp = cx.wp + o0 * Cu * KK;
  const bool sum_y = !cx.p->y;     // given, y is read below and not summed
  for (int u = 0; u < kOutBlock; ++u) y[u][0] = y[u][1] = gone[u][0] = gone[u][1] = v16f{};
  for (int64_t i = 0; i < Cu; ++i) {
    const int64_t c = mp.used[size_t(i)];
    const float* col = cx.cols + i * KK * ld + j0;
    const float* wc = wp + i * KK * kOutBlock;
    v16f acc[kOutBlock][2] = {};
    for (int64_t t = 0; t < KK; ++t) {
      const v16f x0 = load16(col + t * ld), x1 = load16(col + t * ld + 16);
      for (int u = 0; u < kOutBlock; ++u) {
        const float wv = wc[t * kOutBlock + u];
        acc[u][0] += wv * x0;
        acc[u][1] += wv * x1;
      }
    }
    if (sum_y) {
      for (int u = 0; u < kOutBlock; ++u) {
        y[u][0] += acc[u][0];
        y[u][1] += acc[u][1];
      }
    }
    const int8_t role = mp.role[size_t(c)];
    if (role == 1) {
      for (int u = 0; u < kOutBlock; ++u) {
        gone[u][0] += acc[u][0];
        gone[u][1] += acc[u][1];
      }
    } else if (role == 2) {
      float* zc = z + int64_t(mp.slot[size_t(c)]) * kOutBlock * kLanes;
      for (int u = 0; u < kOutBlock; ++u) {
        std::memcpy(zc + u * kLanes, &acc[u][0], sizeof(v16f));
        std::memcpy(zc + u * kLanes + 16, &acc[u][1], sizeof(v16f));
      }
    }
  }
  if (cx.p->y) {
    const float* yr = cx.p->y + o0 * cx.p->y_ld + cx.q0 + j0;
    for (int u = 0; u < kOutBlock; ++u) {
      y[u][0] = load16(yr + u * cx.p->y_ld);
      y[u][1] = load16(yr + u * cx.p->y_ld + 16);
    }
  }
}

// One group's subset sums with NB = b bits known at compile time: per half tile the NB rows of
// z in registers, every entry formed in registers from a smaller one and stored once (the
// generic loop below reloads each entry it adds to).
template <int NB>
AOFP_INLINE void group_table(const float* __restrict z, float* __restrict tg) {
  constexpr int E = 1 << NB;
  constexpr int64_t zs = kOutBlock * kLanes;  // from one varying channel's row to the next
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    v16f zz[NB], t[E];
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i) zz[i] = load16(z + i * zs + 16 * h);
#pragma GCC unroll 64
    for (int s = 1; s < E; ++s) {
      const int low = s & (s - 1);
      t[s] = low == 0 ? zz[__builtin_ctz(s)] : t[low] + zz[__builtin_ctz(s)];
      std::memcpy(tg + s * kLanes + 16 * h, &t[s], sizeof(v16f));
    }
  }
}

// Subset sums of output u's varying contributions over groups [g0, g1): entry s of group g,
// at tab[((g - g0) * 2^b + s) * kLanes], is the sum of z over the bits of s (entry 0 stays 0).
AOFP_INLINE void build_tables(const MaskPlan& mp, const float* __restrict z, int u, int64_t g0,
                              int64_t g1, float* __restrict tab) {
  for (int64_t grp = g0; grp < g1; ++grp) {
    const int64_t v0 = grp * mp.bits, nb = std::min<int64_t>(mp.bits, mp.Cv - v0);
    float* tg = tab + (grp - g0) * mp.entries * kLanes;
    const float* zg = z + (v0 * kOutBlock + u) * kLanes;
    if (nb == 4) {
      group_table<4>(zg, tg);
    } else if (nb == 3) {
      group_table<3>(zg, tg);
    } else if (nb == 2) {
      group_table<2>(zg, tg);
    } else {
      for (int64_t s = 1; s < (int64_t(1) << nb); ++s) {
        const int64_t low = s & (s - 1);
        const int64_t bit = __builtin_ctzll(uint64_t(s));
        const float* zr = z + ((v0 + bit) * kOutBlock + u) * kLanes;
        const float* tl = tg + low * kLanes;
        const v16f r0 = load16(tl) + load16(zr), r1 = load16(tl + 16) + load16(zr + 16);
        std::memcpy(tg + s * kLanes, &r0, sizeof(v16f));
        std::memcpy(tg + s * kLanes + 16, &r1, sizeof(v16f));
      }
    }
  }
}

// d[k] += the table entries of masks [k0, k0 + kn) over groups [g0, g1) (tables as laid out by
// build_tables), four masks at a time (k0 and the buffer d are whole quads: the codes of the
// masks past the last are the zero entry).
AOFP_INLINE void sum_masks(const MaskPlan& mp, const float* __restrict tab, int64_t k0,
                           int64_t kn, int64_t g0, int64_t g1, float* __restrict d) {
  const int64_t ng = mp.ngroups, step = mp.entries * kLanes;
  for (int64_t k = 0; k < kn; k += 4) {
    float* dk = d + k * kLanes;
    v16f a0 = load16(dk), a1 = load16(dk + 16), b0 = load16(dk + 32), b1 = load16(dk + 48);
    v16f c0 = load16(dk + 64), c1 = load16(dk + 80), e0 = load16(dk + 96),
         e1 = load16(dk + 112);
    const uint16_t* q = mp.codes.data() + ((k0 + k) / 4 * ng + g0) * 4;
    const float* tg = tab;
    for (int64_t g = g0; g < g1; ++g, tg += step, q += 4) {
      uint64_t c4;  // the four masks' codes in one load
      std::memcpy(&c4, q, sizeof(c4));
      const float* ta = tg + (c4 & 0xffff);
      const float* tb = tg + ((c4 >> 16) & 0xffff);
      const float* tc = tg + ((c4 >> 32) & 0xffff);
      const float* te = tg + (c4 >> 48);
      a0 += load16(ta);
      a1 += load16(ta + 16);
      b0 += load16(tb);
      b1 += load16(tb + 16);
      c0 += load16(tc);
      c1 += load16(tc + 16);
      e0 += load16(te);
      e1 += load16(te + 16);
    }
    const v16f out[8] = {a0, a1, b0, b1, c0, c1, e0, e1};
    std::memcpy(dk, out, sizeof(out));
  }
}

// Square and Relu: acc[k, o] += the tile's sum for masks [k0, k0 + kn), four at a time (d
// holds whole quads).
AOFP_INLINE void damage_epilogue(const Ctx& cx, int64_t o, int64_t k0, int64_t kn, int64_t n,
                                 const float* __restrict w, const float* __restrict base,
                                 const float* __restrict d) {
  const MaskPassArgs& a = *cx.a;
  const int64_t K = cx.p->K;
  const bool relu = a.epilogue == Epilogue::Relu;
  const float s2 = a.base_scale ? a.base_scale[o] * a.base_scale[o] : 1.f;
  const Lanes ln(n);
  const v16f w0 = load16(w), w1 = load16(w + 16), b0 = load16(base), b1 = load16(base + 16);
  for (int64_t kk = 0; kk < kn; kk += 4) {
    v16f sq[4];
    for (int i = 0; i < 4; ++i) {
      const int64_t k = std::min(k0 + kk + i, k0 + kn - 1);  // past the last: a repeat, unused
      v16f r0 = load16(d + (kk + i) * kLanes), r1 = load16(d + (kk + i) * kLanes + 16);
      if (relu) {
        const float A = cx.A ? cx.A[o * K + k] : a.base_scale[o];
        const float B = cx.B ? cx.B[o * K + k] : a.base_shift[o];
        r0 = relu16(A * (w0 - r0) + B) - b0;
        r1 = relu16(A * (w1 - r1) + B) - b1;
      }
      r0 = keep(ln.v0, r0);
      r1 = keep(ln.v1, r1);
      sq[i] = r0 * r0 + r1 * r1;
    }
    float sums[4];
    sum4x16(sq[0], sq[1], sq[2], sq[3], sums);
    for (int i = 0; i < 4 && kk + i < kn; ++i) {
      const int64_t k = k0 + kk + i;
      if (!cx.mp->removes[size_t(k)]) continue;  // keeps every channel: exactly zero damage
      cx.acc[o * K + k] += relu ? double(sums[i]) : double(s2) * double(sums[i]);
    }
  }
}

// BnStats for masks [k0, k0 + kn): the tile's sums (its n valid positions; w holds y), four
// masks at a time. The output's first tile sets the masks' shifts first.
AOFP_INLINE void stats_epilogue(const Ctx& cx, int64_t o, int64_t k0, int64_t kn, int64_t n,
                                bool first, const float* __restrict w,
                                const float* __restrict d) {
  Stats& st = *cx.stats;
  const int64_t K = cx.p->K;
  const float sy = st.yshift[size_t(o)];
  const Lanes ln(n);
  const v16f f0 = keep(ln.v0, load16(w) - sy), f1 = keep(ln.v1, load16(w + 16) - sy);
  if (first) {
    float f[kLanes];
    std::memcpy(f, &f0, sizeof(v16f));
    std::memcpy(f + 16, &f1, sizeof(v16f));
    for (int64_t kk = 0; kk < kn; ++kk) {
      const float* dk = d + kk * kLanes;
      float* sh = st.shift.data() + (o * K + k0 + kk) * 2;
      float s1 = 0.f, s2 = 0.f;
      for (int64_t j = 0; j < n; ++j) s1 += dk[j];
      sh[0] = s1 / float(n);
      for (int64_t j = 0; j < n; ++j) s2 += f[j] - (dk[j] - sh[0]);
      sh[1] = s2 / float(n);
    }
  }
  for (int64_t kk = 0; kk < kn; kk += 4) {
    v16f r[5][4];
    for (int i = 0; i < 4; ++i) {
      const int64_t k = std::min(k0 + kk + i, k0 + kn - 1);  // past the last: a repeat, unused
      const float* sh = st.shift.data() + (o * K + k) * 2;
      const float* dk = d + (kk + i) * kLanes;
      const v16f a0 = keep(ln.v0, load16(dk) - sh[0]), a1 = keep(ln.v1, load16(dk + 16) - sh[0]);
      const v16f b0 = keep(ln.v0, f0 - a0 - sh[1]), b1 = keep(ln.v1, f1 - a1 - sh[1]);
      r[0][i] = a0 + a1;
      r[1][i] = a0 * a0 + a1 * a1;
      r[2][i] = f0 * a0 + f1 * a1;
      r[3][i] = b0 + b1;
      r[4][i] = b0 * b0 + b1 * b1;
    }
    float sums[5][4];
    for (int m = 0; m < 5; ++m) sum4x16(r[m][0], r[m][1], r[m][2], r[m][3], sums[m]);
    for (int i = 0; i < 4 && kk + i < kn; ++i) {
      const int64_t k = k0 + kk + i;
      if (!cx.mp->removes[size_t(k)]) continue;
      double* sm = st.sums.data() + (o * K + k) * 5;
      for (int m = 0; m < 5; ++m) sm[m] += double(sums[m][i]);
    }
  }
}

// BnStats: y's own shifted sums over the tile (its shift set by the output's first tile).
AOFP_INLINE void stats_of_y(Stats& st, int64_t o, int64_t n, bool first, const float* w) {
  if (first) {
    float s = 0.f;
    for (int64_t j = 0; j < n; ++j) s += w[j];
    st.yshift[size_t(o)] = s / float(n);
  }
  const float sy = st.yshift[size_t(o)];
  float f1 = 0.f, f2 = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    f1 += w[j] - sy;
    f2 += (w[j] - sy) * (w[j] - sy);
  }
  st.ysums[size_t(2 * o)] += double(f1);
  st.ysums[size_t(2 * o + 1)] += double(f2);
}

AOFP_INLINE double nonneg(double v) { return v < 0.0 ? 0.0 : v; }  // keeps NaN

// The centred moments of MaskPassArgs (BnStats) from the shifted sums over P positions.
void stats_moments(const Stats& st, int64_t K, int64_t O, int64_t P, double* acc,
                   double* ystat) {
  const double Pd = double(P);
  for (int64_t o = 0; o < O; ++o) {
    const double f1 = st.ysums[size_t(2 * o)], f2 = st.ysums[size_t(2 * o + 1)];
    ystat[2 * o] = double(st.yshift[size_t(o)]) + f1 / Pd;
    ystat[2 * o + 1] = nonneg(f2 - f1 * f1 / Pd);
    for (int64_t k = 0; k < K; ++k) {
      const double* sm = st.sums.data() + (o * K + k) * 5;
      double* m = acc + (k * O + o) * 4;
      m[0] = double(st.shift[size_t((o * K + k) * 2)]) + sm[0] / Pd;
      m[1] = nonneg(sm[1] - sm[0] * sm[0] / Pd);
      m[2] = sm[2] - f1 * sm[0] / Pd;
      m[3] = nonneg(sm[4] - sm[3] * sm[3] / Pd);
    }
  }
}

// One tile: output channels [o0, o0 + no) x positions [j0, j0 + n) of the chunk.
AOFP_HOT void run_tile(const Ctx& cx, int64_t o0, int64_t no, int64_t j0, int64_t n,
                       Scratch& sc) {
  const MaskedDamageParams& p = *cx.p;
  const MaskPassArgs& a = *cx.a;
  const MaskPlan& mp = *cx.mp;
  v16f y[kOutBlock][2], gone[kOutBlock][2];
  tile_contributions(cx, o0, j0, sc.z.data(), y, gone);
  for (int64_t u = 0; u < no; ++u) {
    const int64_t o = o0 + u;
    const float off = (p.bias ? p.bias[o] : 0.f) - (a.centre ? float(a.centre[o]) : 0.f);
    for (int h = 0; h < 2; ++h) {
      const v16f w = y[u][h] + off;
      std::memcpy(sc.w.data() + u * kLanes + 16 * h, &w, sizeof(v16f));
      std::memcpy(sc.gone.data() + u * kLanes + 16 * h, &gone[u][h], sizeof(v16f));
      if (a.epilogue == Epilogue::Relu) {
        const v16f base = relu16(a.base_scale[o] * w + a.base_shift[o]);
        std::memcpy(sc.base.data() + u * kLanes + 16 * h, &base, sizeof(v16f));
      }
    }
  }
  const bool first = cx.q0 + j0 == 0;  // BnStats: the first tile of these outputs
  for (int64_t u = 0; u < no; ++u) {
    const int64_t o = o0 + u;
    const float* w = sc.w.data() + u * kLanes;
    if (a.epilogue == Epilogue::BnStats) stats_of_y(*cx.stats, o, n, first, w);
    for (int64_t k0 = 0; k0 < p.K; k0 += kMaskBlock) {
      const int64_t kn = std::min(kMaskBlock, p.K - k0);
      const v16f g0v = load16(sc.gone.data() + u * kLanes);
      const v16f g1v = load16(sc.gone.data() + u * kLanes + 16);
      for (int64_t k = 0; k < ceil_div(kn, 4) * 4; ++k) {  // every d_k starts at `gone`
        std::memcpy(sc.d.data() + k * kLanes, &g0v, sizeof(v16f));
        std::memcpy(sc.d.data() + k * kLanes + 16, &g1v, sizeof(v16f));
      }
      for (int64_t g0 = 0; g0 < mp.ngroups; g0 += mp.chunk) {
        const int64_t g1 = std::min(mp.ngroups, g0 + mp.chunk);
        build_tables(mp, sc.z.data(), int(u), g0, g1, sc.tab.data());
        sum_masks(mp, sc.tab.data(), k0, kn, g0, g1, sc.d.data());
      }
      if (a.epilogue == Epilogue::BnStats)
        stats_epilogue(cx, o, k0, kn, n, first, w, sc.d.data());
      else
        damage_epilogue(cx, o, k0, kn, n, w, sc.base.data() + u * kLanes, sc.d.data());
    }
  }
}

}  // namespace

void mask_pass(const MaskedDamageParams& p, const MaskPassArgs& a, const ParallelFor& pfor) {
  const ConvGeom& g = p.g;
  const int64_t P = g.positions(), C = g.C, KK = g.taps(), O = g.O;
  if (p.K == 0 || P == 0 || O == 0 || C == 0) return;
  // Square reads d only; Relu and BnStats read y too
  const MaskPlan mp = plan_masks(p, a.epilogue != Epilogue::Square && !p.y);
  const int64_t Cu = int64_t(mp.used.size());
  // Chunks of positions whose im2col (of the used channels) stays in L2 while every output
  // block reads it, a multiple of the tile; every row is padded with zeros to a whole tile so
  // a tile never reads past its row.
  const int64_t per_col = std::max<int64_t>(1, Cu * KK);
  const int64_t chunk = std::min(std::max<int64_t>(kLanes, kColsBudget / per_col / kLanes * kLanes),
                                 ceil_div(P, kLanes) * kLanes);
  const int64_t ld = chunk;
  AlignedFloats cols(size_t(per_col * ld));
  const int64_t n_tasks = ceil_div(O, kOutBlock);
  const std::vector<float> wp = pack_weights(p, mp.used);
  Stats stats;
  if (a.epilogue == Epilogue::BnStats) {
    stats.shift.assign(size_t(p.K * O * 2), 0.f);
    stats.sums.assign(size_t(p.K * O * 5), 0.0);
    stats.yshift.assign(size_t(O), 0.f);
    stats.ysums.assign(size_t(O * 2), 0.0);
  }
  // Output-major copies of the (K, O) arrays the epilogues read and write per output.
  const int64_t K = p.K;
  std::vector<double> acc_ok;
  std::vector<float> A_ok, B_ok;
  if (a.epilogue != Epilogue::BnStats) acc_ok.assign(size_t(O * K), 0.0);
  if (a.mask_scale) A_ok = transposed(a.mask_scale, K, O);
  if (a.mask_shift) B_ok = transposed(a.mask_shift, K, O);
  Ctx cx{&p,           &a,
         &mp,          wp.data(),
         cols.data(),  ld,
         0,            &stats,
         acc_ok.data(), a.mask_scale ? A_ok.data() : nullptr,
         a.mask_shift ? B_ok.data() : nullptr};
  PositionRange pr;
  for (int64_t q0 = 0; q0 < P; q0 += chunk) {
    const int64_t nq = std::min(chunk, P - q0);
    pr.set(g, q0, nq);
    im2col_list(g, p.x, pr, mp.used.data(), Cu, cols.data(), ld, pfor);
    const int64_t padded = ceil_div(nq, kLanes) * kLanes;
    if (padded > nq)
      for (int64_t r = 0; r < Cu * KK; ++r)
        std::fill(cols.data() + r * ld + nq, cols.data() + r * ld + padded, 0.f);
    cx.q0 = q0;
    pfor(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
      const size_t rows = size_t(kOutBlock * kLanes);
      Scratch sc{AlignedFloats(size_t(std::max<int64_t>(mp.Cv, 1)) * rows), AlignedFloats(rows),
                 AlignedFloats(rows), AlignedFloats(rows),
                 AlignedFloats(size_t(mp.chunk * mp.entries * kLanes)),
                 AlignedFloats(size_t(kMaskBlock * kLanes))};
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t o0 = t * kOutBlock, no = std::min(kOutBlock, O - o0);
        for (int64_t j0 = 0; j0 < nq; j0 += kLanes)
          run_tile(cx, o0, no, j0, std::min(kLanes, nq - j0), sc);
      }
    });
  }
  if (a.epilogue == Epilogue::BnStats) {
    stats_moments(stats, K, O, P, a.acc, a.ystat);
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t o = 0; o < O; ++o) a.acc[k * O + o] += acc_ok[size_t(o * K + k)];
  }
}

}  // namespace cpu
}  // namespace aofp
