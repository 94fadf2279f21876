// masked_damage on the CPU: the damage of K channel masks at a follower's output in one pass.
//
// Algebra (docs/kernels.md): the follower output with mask k is y_k = y - d_k, where
// d_k = sum over the channels c that mask k removes of z_c = conv(x[:, c], W[:, c]).
// Per tile of (output channels x positions) the kernel computes the contributions z_c once,
// then prices every mask. The masks are 0/1, so R @ Z is a boolean-matrix product: the
// channels are cut into groups of b bits and, per group, all 2^b subset sums of z_c are
// tabulated once per tile ("method of the four Russians"); d_k is then the sum of
// ceil(C / b) table rows instead of C multiply-adds. The nonlinearity and the squared
// difference are applied to each row of d_k in registers and reduced at once, so no masked
// output is ever stored: memory is bounded by the tile, for any K and N. post = "relu" runs the
// ReLU pass of relu_pass_cpu.cpp instead (the same algebra, blocked for the L1 cache).
//
// Accumulation: rows of at most `kMaxRow` positions are summed in float32, and those partial
// sums in float64 per (mask, output channel); the per-mask damage sums those in float64.
//
// BatchNorm on batch statistics needs, per (k, o), the mean of d and the centred moments
// M2(d), C(u, d), M2(u - d) with u = y - mean(y). Centred moments do not depend on where u is
// centred, so one pass gathers them from u = y together with the mean and M2 of y itself (row
// means first, rows merged with Chan's formula, so no sum of squares loses precision to a large
// mean), and for post = "none" the damage follows in closed form; for post = "relu" the ReLU
// pass applies each mask's own normalisation and clips.
#include <cmath>
#include <limits>

#include "kernels/cpu_common.h"
#include "kernels/relu_pass.h"

namespace aofp {
namespace cpu {

namespace {

constexpr int64_t kTableBudget = int64_t(1) << 18;  // floats of subset tables per task (1 MiB)
constexpr int64_t kColsBudget = int64_t(1) << 20;   // floats of im2col per chunk (4 MiB)
constexpr int64_t kMinRow = 16;
constexpr int64_t kMaxRow = 1024;

enum class Pass { Linear, BnStats };

struct Plan {
  int bits = 1;          // channels per subset table
  int64_t ngroups = 0;   // ceil(C / bits)
  int64_t entries = 0;   // 2^bits
  int64_t O_t = 1;       // output channels per task
  int64_t P_t = 1;       // positions per tile
  int64_t P_chunk = 1;   // positions per im2col chunk (multiple of P_t unless it is P)
  int64_t n_tasks = 1;
};

// Tables cost about (2^b / b) * C adds per tile element, the mask pass K * C / b.
int choose_bits(int64_t K, int64_t C) {
  int best = 1;
  double best_cost = std::numeric_limits<double>::infinity();
  for (int b = 1; b <= 8; ++b) {
    if (b > 1 && (int64_t(1) << (b - 1)) >= 2 * C) break;
    const double groups = double(ceil_div(C, b));
    const double rows = groups * double(int64_t(1) << b);
    if (b > 1 && rows * kMinRow > double(kTableBudget)) break;
    const double cost = rows + double(K) * groups;
    if (cost < best_cost) {
      best_cost = cost;
      best = b;
    }
  }
  return best;
}

Plan make_plan(const ConvGeom& g, int64_t K) {
  Plan pl;
  pl.bits = choose_bits(K, g.C);
  pl.ngroups = ceil_div(g.C, pl.bits);
  pl.entries = int64_t(1) << pl.bits;
  const int64_t rows = pl.ngroups * pl.entries;
  const int64_t P = g.positions();
  // Four output channels per tile (they share the im2col loads of Z) unless that makes rows
  // shorter than 128 positions; long rows amortise the per-row work of the mask pass. Depends
  // on the shapes alone, not on the thread count, so results are the same on any machine.
  const int64_t tile_max = std::max<int64_t>(kMinRow, kTableBudget / rows);
  pl.O_t = std::min<int64_t>(4, g.O);
  if (tile_max / pl.O_t < 128) pl.O_t = 1;
  int64_t pt = std::min(tile_max / pl.O_t, kMaxRow);
  if (pt >= 16) pt -= pt % 16;
  pl.P_t = std::max<int64_t>(1, std::min(pt, P));
  if (pl.P_t < pt) {  // few positions (e.g. a Linear follower): more channels per tile instead
    pl.O_t = std::max(pl.O_t, std::min(ceil_div(g.O, 8), tile_max / pl.P_t));
  }
  pl.n_tasks = ceil_div(g.O, pl.O_t);
  const int64_t ck = std::max<int64_t>(1, g.C * g.taps());
  int64_t pc = std::max(pl.P_t, (kColsBudget / ck) / pl.P_t * pl.P_t);
  pl.P_chunk = std::min(pc, P);
  return pl;
}

// Row kernels -------------------------------------------------------------------------------

// d[j] = sum over rows r of rows[r][j]
AOFP_INLINE void sum_rows(float* __restrict d, const float* const* rows, int64_t nrows,
                          int64_t n) {
  int64_t r = 0;
  if (nrows >= 2) {
    const float* __restrict a = rows[0];
    const float* __restrict b = rows[1];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) d[j] = a[j] + b[j];
    r = 2;
  } else {
    const float* __restrict a = rows[0];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) d[j] = a[j];
    r = 1;
  }
  for (; r + 3 < nrows; r += 4) {
    const float* __restrict a = rows[r];
    const float* __restrict b = rows[r + 1];
    const float* __restrict c = rows[r + 2];
    const float* __restrict e = rows[r + 3];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) d[j] += (a[j] + b[j]) + (c[j] + e[j]);
  }
  for (; r + 1 < nrows; r += 2) {
    const float* __restrict a = rows[r];
    const float* __restrict b = rows[r + 1];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) d[j] += a[j] + b[j];
  }
  for (; r < nrows; ++r) {
    const float* __restrict a = rows[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) d[j] += a[j];
  }
}

// Centred second moments of one row: with e = d - mean(d), f = u - mean_u,
// out = {sum e^2, sum f e, sum (f - e)^2}. Row means first, so nothing cancels.
// Fused row sum + epilogue for R table rows (R known at compile time, so the row loop
// unrolls and the position loop vectorises; d never goes through memory).
#define AOFP_LOAD_ROWS                                                     \
  const float* __restrict r0 = rows[0];                                    \
  const float* __restrict r1 = rows[R > 1 ? 1 : 0];                        \
  const float* __restrict r2 = rows[R > 2 ? 2 : 0];                        \
  const float* __restrict r3 = rows[R > 3 ? 3 : 0];                        \
  const float* __restrict r4 = rows[R > 4 ? 4 : 0];                        \
  const float* __restrict r5 = rows[R > 5 ? 5 : 0];                        \
  const float* __restrict r6 = rows[R > 6 ? 6 : 0];                        \
  const float* __restrict r7 = rows[R > 7 ? 7 : 0];

#define AOFP_ROW_SUM(j)                                                    \
  (((r0[j] + (R > 1 ? r1[j] : 0.f)) + ((R > 2 ? r2[j] : 0.f) + (R > 3 ? r3[j] : 0.f))) + \
   (((R > 4 ? r4[j] : 0.f) + (R > 5 ? r5[j] : 0.f)) +                      \
    ((R > 6 ? r6[j] : 0.f) + (R > 7 ? r7[j] : 0.f))))

template <int R>
AOFP_INLINE float sq_rows(const float* const* rows, int64_t n) {
  AOFP_LOAD_ROWS
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const float d = AOFP_ROW_SUM(j);
    s += d * d;
  }
  return s;
}

constexpr int kFusedRows = 8;

// Reduces `rows` to at most kFusedRows pointers: the leading rows are summed into d.
AOFP_INLINE int64_t fold_rows(float* d, const float** rows, int64_t ne, int64_t n) {
  if (ne <= kFusedRows) return ne;
  const int64_t lead = ne - (kFusedRows - 1);
  sum_rows(d, rows, lead, n);
  rows[lead - 1] = d;
  for (int64_t i = 0; i < kFusedRows; ++i) rows[i] = rows[lead - 1 + i];
  return kFusedRows;
}

#define AOFP_ROWS_SWITCH(ne, CALL) \
  switch (ne) {                    \
    case 1: CALL(1); break;        \
    case 2: CALL(2); break;        \
    case 3: CALL(3); break;        \
    case 4: CALL(4); break;        \
    case 5: CALL(5); break;        \
    case 6: CALL(6); break;        \
    case 7: CALL(7); break;        \
    default: CALL(8); break;       \
  }

AOFP_INLINE void bn_row_moments(const float* __restrict u, const float* __restrict d,
                                float mean_u, int64_t n, float* mean_d_out, float* out3) {
  float sd = 0.f;
#pragma omp simd reduction(+ : sd)
  for (int64_t j = 0; j < n; ++j) sd += d[j];
  const float md = sd / float(n);
  float m2d = 0.f, cud = 0.f, m2v = 0.f;
#pragma omp simd reduction(+ : m2d, cud, m2v)
  for (int64_t j = 0; j < n; ++j) {
    const float e = d[j] - md, f = u[j] - mean_u, v = f - e;
    m2d += e * e;
    cud += f * e;
    m2v += v * v;
  }
  *mean_d_out = md;
  out3[0] = m2d;
  out3[1] = cud;
  out3[2] = m2v;
}

// Everything one pass shares (read-only inside the parallel region).
struct PassCtx {
  const MaskedDamageParams* p;
  const Plan* pl;
  Pass pass;
  const float* cols;      // im2col of the current chunk, leading dimension ld
  int64_t ld;
  int64_t q_chunk;        // first position of the chunk
  int64_t n_chunk;        // positions in the chunk
  // mask structure: for mask k, entries [koff[k], koff[k+1]) of kent are table entry indices
  const int64_t* koff;
  const int32_t* kent;
  // per-channel constants
  const float* slope;     // per o
  // outputs
  double* acc;            // (K x O) damage sums, or (K x O x 4) BN moments
  double* ystat;          // BnStats: per o {mean, M2} of y over the positions seen so far
};

// Chan et al.'s merge of a block of nb values (mean mb, centred sum of squares m2b) into a
// running {mean, M2} of na values.
AOFP_INLINE void merge_moments(double* mean, double* m2, double na, double nb, double mb,
                               double m2b) {
  const double nt = na + nb, delta = mb - *mean;
  *mean += delta * nb / nt;
  *m2 += m2b + delta * delta * na * nb / nt;
}

// Per-task scratch buffers.
struct Scratch {
  std::vector<float> z, tab, y, w, d, rowstat;
  std::vector<const float*> rows;
};

// z[c][ol][j] for c in [0, C), ol in [0, no), j in [0, n): contributions of the tile.
AOFP_INLINE void compute_z(const PassCtx& cx, int64_t o0, int64_t no, int64_t j0, int64_t n,
                           float* z, int64_t ldz) {
  const ConvGeom& g = cx.p->g;
  contributions(cx.p->weight, nullptr, g.C, g.taps(), cx.cols, cx.ld, j0, n, o0, no, 0, g.C, z,
                cx.pl->O_t, ldz);
}

// y[ol][j] = bias[o] + sum_c z[c][ol][j]
AOFP_INLINE void compute_y(const PassCtx& cx, int64_t o0, int64_t no, int64_t n, const float* z,
                           int64_t ldz, float* y) {
  const ConvGeom& g = cx.p->g;
  for (int64_t ol = 0; ol < no; ++ol) {
    float* __restrict yr = y + ol * ldz;
    const float b = cx.p->bias ? cx.p->bias[o0 + ol] : 0.f;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) yr[j] = b;
    for (int64_t c = 0; c < g.C; ++c) {
      const float* __restrict zr = z + (c * cx.pl->O_t + ol) * ldz;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) yr[j] += zr[j];
    }
  }
}

// Subset sums: tab[(grp * entries + s) * O_t + ol] row = sum of z over the bits of s.
AOFP_INLINE void build_tables(const PassCtx& cx, int64_t no, int64_t n, const float* z,
                              int64_t ldz, float* tab) {
  const Plan& pl = *cx.pl;
  const int64_t C = cx.p->g.C;
  for (int64_t grp = 0; grp < pl.ngroups; ++grp) {
    const int64_t c0 = grp * pl.bits;
    const int64_t nb = std::min<int64_t>(pl.bits, C - c0);
    for (int64_t s = 1; s < (int64_t(1) << nb); ++s) {
      const int64_t low = s & (s - 1);            // s without its lowest bit
      const int64_t bit = __builtin_ctzll(uint64_t(s));
      for (int64_t ol = 0; ol < no; ++ol) {
        float* __restrict t = tab + ((grp * pl.entries + s) * pl.O_t + ol) * ldz;
        const float* __restrict zr = z + ((c0 + bit) * pl.O_t + ol) * ldz;
        if (low == 0) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) t[j] = zr[j];
        } else {
          const float* __restrict tl = tab + ((grp * pl.entries + low) * pl.O_t + ol) * ldz;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) t[j] = tl[j] + zr[j];
        }
      }
    }
  }
}

// One tile: output channels [o0, o0 + no) x positions [j0, j0 + n) of the chunk.
AOFP_HOT void run_tile(const PassCtx& cx, int64_t o0, int64_t no, int64_t j0, int64_t n,
                       Scratch& sc) {
  const MaskedDamageParams& p = *cx.p;
  const Plan& pl = *cx.pl;
  const int64_t O = p.g.O;
  const int64_t ldz = pl.P_t;
  compute_z(cx, o0, no, j0, n, sc.z.data(), ldz);

  // The BN statistics pass reads the unmasked output y.
  if (cx.pass == Pass::BnStats) {
    compute_y(cx, o0, no, n, sc.z.data(), ldz, sc.y.data());
    for (int64_t ol = 0; ol < no; ++ol) {
      float* __restrict wr = sc.w.data() + ol * ldz;
      const float* __restrict yr = sc.y.data() + ol * ldz;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) wr[j] = yr[j];
    }
  }

  build_tables(cx, no, n, sc.z.data(), ldz, sc.tab.data());

  const double na = double(cx.q_chunk + j0);  // positions of each o merged before this tile
  if (cx.pass == Pass::BnStats) {  // row mean and M2 of u = y
    for (int64_t ol = 0; ol < no; ++ol) {
      const float* __restrict wr = sc.w.data() + ol * ldz;
      float s1 = 0.f;
#pragma omp simd reduction(+ : s1)
      for (int64_t j = 0; j < n; ++j) s1 += wr[j];
      const float mb = s1 / float(n);
      float s2 = 0.f;
#pragma omp simd reduction(+ : s2)
      for (int64_t j = 0; j < n; ++j) s2 += (wr[j] - mb) * (wr[j] - mb);
      sc.rowstat[2 * ol] = mb;
      sc.rowstat[2 * ol + 1] = s2;
    }
  }

  float* d = sc.d.data();
  const float** rows = sc.rows.data();
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t e0 = cx.koff[k], ne = cx.koff[k + 1] - e0;
    if (ne == 0) continue;  // the mask removes nothing: exactly zero damage
    for (int64_t ol = 0; ol < no; ++ol) {
      const int64_t o = o0 + ol;
      for (int64_t e = 0; e < ne; ++e)
        rows[e] = sc.tab.data() + (int64_t(cx.kent[e0 + e]) * pl.O_t + ol) * ldz;
      double* acc = cx.acc + k * O + o;
      switch (cx.pass) {
        case Pass::Linear: {
          const float a = cx.slope[o];
          const int64_t nr = fold_rows(d, rows, ne, n);
          float s = 0.f;
#define AOFP_SQ(R) s = sq_rows<R>(rows, n)
          AOFP_ROWS_SWITCH(nr, AOFP_SQ)
#undef AOFP_SQ
          acc[0] += double(a) * double(a) * double(s);
          break;
        }
        case Pass::BnStats: {
          sum_rows(d, rows, ne, n);
          // Per (k, o): {mean d, M2 of d, co-moment of (u, d), M2 of u - d}, merged per row.
          const float mu = sc.rowstat[2 * ol];
          float md, m3[3];
          bn_row_moments(sc.w.data() + ol * ldz, d, mu, n, &md, m3);
          double* st = cx.acc + (k * O + o) * 4;
          const double nb = double(n), nt = na + nb, f = na * nb / nt;
          const double dd = double(md) - st[0], du = double(mu) - cx.ystat[2 * o], dv = du - dd;
          st[0] += dd * nb / nt;
          st[1] += double(m3[0]) + dd * dd * f;
          st[2] += double(m3[1]) + du * dd * f;
          st[3] += double(m3[2]) + dv * dv * f;
          break;
        }
        default:
          break;
      }
    }
  }
  if (cx.pass == Pass::BnStats) {  // the row of y joins its running moments (after the masks')
    for (int64_t ol = 0; ol < no; ++ol) {
      double* st = cx.ystat + 2 * (o0 + ol);
      merge_moments(st, st + 1, na, double(n), sc.rowstat[2 * ol], sc.rowstat[2 * ol + 1]);
    }
  }
}

// Runs one pass over every position chunk; tasks own disjoint output-channel blocks.
void run_pass(PassCtx cx, const ParallelFor& pfor) {
  const MaskedDamageParams& p = *cx.p;
  const Plan& pl = *cx.pl;
  const ConvGeom& g = p.g;
  const int64_t P = g.positions();
  const int64_t KK = g.taps();
  std::vector<float> cols(size_t(g.C * KK) * size_t(pl.P_chunk));
  PositionRange pr;
  for (int64_t q0 = 0; q0 < P; q0 += pl.P_chunk) {
    const int64_t nq = std::min(pl.P_chunk, P - q0);
    pr.set(g, q0, nq);
    im2col(g, p.x, pr, cols.data(), pl.P_chunk, pfor);
    cx.cols = cols.data();
    cx.ld = pl.P_chunk;
    cx.q_chunk = q0;
    cx.n_chunk = nq;
    pfor(0, pl.n_tasks, 1, [&](int64_t t0, int64_t t1) {
      Scratch sc;
      const size_t tile = size_t(pl.O_t) * size_t(pl.P_t);
      sc.z.assign(size_t(g.C) * tile, 0.f);
      sc.y.assign(tile, 0.f);
      sc.w.assign(tile, 0.f);
      sc.d.assign(size_t(pl.P_t), 0.f);
      sc.tab.assign(size_t(pl.ngroups * pl.entries) * tile, 0.f);
      sc.rowstat.assign(size_t(2 * pl.O_t), 0.f);
      sc.rows.assign(size_t(pl.ngroups), nullptr);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t o0 = t * pl.O_t;
        const int64_t no = std::min(pl.O_t, g.O - o0);
        for (int64_t j0 = 0; j0 < nq; j0 += pl.P_t) {
          run_tile(cx, o0, no, j0, std::min(pl.P_t, nq - j0), sc);
        }
      }
    });
  }
}

// Mask structure: for mask k, the nonzero subset index of each table group.
struct MaskIndex {
  std::vector<int64_t> koff;      // entries [koff[k], koff[k + 1]) of kent belong to mask k
  std::vector<int32_t> kent;      // table entry indices
  std::vector<uint8_t> all_drop;  // mask k removes every channel
};

MaskIndex index_masks(const MaskedDamageParams& p, const Plan& pl) {
  const int64_t K = p.K, C = p.g.C;
  MaskIndex mi;
  mi.koff.assign(size_t(K) + 1, 0);
  mi.all_drop.assign(size_t(K), 0);
  mi.kent.reserve(size_t(K * pl.ngroups));
  for (int64_t k = 0; k < K; ++k) {
    const uint8_t* m = p.masks + k * C;
    for (int64_t grp = 0; grp < pl.ngroups; ++grp) {
      int64_t s = 0;
      const int64_t c0 = grp * pl.bits;
      const int64_t nb = std::min<int64_t>(pl.bits, C - c0);
      for (int64_t i = 0; i < nb; ++i)
        if (!m[c0 + i]) s |= int64_t(1) << i;
      if (s) mi.kent.push_back(int32_t(grp * pl.entries + s));
    }
    mi.koff[size_t(k) + 1] = int64_t(mi.kent.size());
    int64_t kept = 0;
    for (int64_t c = 0; c < C; ++c) kept += m[c] ? 1 : 0;
    mi.all_drop[size_t(k)] = kept == 0;
  }
  return mi;
}

// Zeroes the damage; true when there is nothing to price (the zeros are the answer).
bool nothing_to_price(const MaskedDamageParams& p) {
  for (int64_t k = 0; k < p.K; ++k) p.damage[k] = 0.f;
  return p.K == 0 || p.g.positions() == 0 || p.g.O == 0 || p.g.C == 0;
}

// The context every pass of one call shares: the params, the tile plan, the mask structure.
PassCtx make_ctx(const MaskedDamageParams& p, const Plan& pl, const MaskIndex& mi) {
  PassCtx cx{};
  cx.p = &p;
  cx.pl = &pl;
  cx.koff = mi.koff.data();
  cx.kent = mi.kent.data();
  return cx;
}

void sum_damage(const MaskedDamageParams& p, const std::vector<double>& acc) {
  for (int64_t k = 0; k < p.K; ++k) {
    double s = 0.0;
    for (int64_t o = 0; o < p.g.O; ++o) s += acc[size_t(k * p.g.O + o)];
    p.damage[k] = float(s);
  }
}

}  // namespace

void masked_damage(const MaskedDamageParams& p, const ParallelFor& pfor) {
  if (nothing_to_price(p)) return;
  const ConvGeom& g = p.g;
  const int64_t K = p.K, O = g.O;
  const int64_t P = g.positions();

  const Plan pl = make_plan(g, K);
  const MaskIndex mi = index_masks(p, pl);
  const std::vector<int64_t>& koff = mi.koff;
  const std::vector<uint8_t>& all_drop = mi.all_drop;

  std::vector<float> ones(size_t(O), 1.f), zeros(size_t(O), 0.f);
  const float* slope = p.norm == Norm::None ? ones.data() : p.scale;
  const float* offset = p.norm == Norm::None ? zeros.data() : p.shift;

  PassCtx cx = make_ctx(p, pl, mi);
  cx.slope = slope;

  std::vector<double> acc;
  if (p.norm != Norm::Batch) {
    acc.assign(size_t(K * O), 0.0);
    cx.acc = acc.data();
    if (p.post == Post::Relu) {
      ReluPassArgs ra;
      ra.base_scale = slope;
      ra.base_shift = offset;
      ra.acc = acc.data();
      relu_pass(p, ra, pfor);
    } else {
      cx.pass = Pass::Linear;
      run_pass(cx, pfor);
    }
  } else {
    // One pass: per (k, o) centred moments of d and of u - d, and per o the mean and M2 of y.
    std::vector<double> ystat(static_cast<size_t>(2 * O), 0.0);
    std::vector<double> mom(static_cast<size_t>(K * O * 4), 0.0);
    cx.pass = Pass::BnStats;
    cx.ystat = ystat.data();
    cx.acc = mom.data();
    run_pass(cx, pfor);
    const double Pd = double(P);
    std::vector<double> mean_y(static_cast<size_t>(O)), var_y(static_cast<size_t>(O));
    for (int64_t o = 0; o < O; ++o) {
      mean_y[size_t(o)] = ystat[size_t(2 * o)];
      var_y[size_t(o)] = ystat[size_t(2 * o + 1)] / Pd;
    }

    // With v = y_k - mean(y_k) = u - e (e = d - mean d), the masked output's variance is
    // var_k = M2(u - d) / P, and the damage of post = "none" is sum (a_k v - a u)^2, which
    // expands two ways; each is free of cancellation in its own regime:
    //   near the base (a_k ~ a):  (a_k - a)^2 P var_y - 2 a_k (a_k - a) C_ud + a_k^2 M2_d
    //   far from it (a_k > 2a):   a_k^2 M2_v - 2 a a_k (P var_y - C_ud) + a^2 P var_y
    acc.assign(static_cast<size_t>(K * O), 0.0);
    std::vector<float> base_a(static_cast<size_t>(O));
    for (int64_t o = 0; o < O; ++o)
      base_a[size_t(o)] = float(double(p.scale[o]) / std::sqrt(var_y[size_t(o)] + p.eps));
    std::vector<float> A, B;
    if (p.post == Post::Relu) {
      A.resize(static_cast<size_t>(K * O));
      B.resize(static_cast<size_t>(K * O));
    }
    for (int64_t k = 0; k < K; ++k) {
      if (koff[size_t(k) + 1] == koff[size_t(k)]) continue;  // removes nothing: damage 0
      for (int64_t o = 0; o < O; ++o) {
        const double* st = mom.data() + (k * O + o) * 4;
        const double gam = p.scale[o], vy = var_y[size_t(o)];
        const double vk = st[3] / Pd;
        const double a = gam / std::sqrt(vy + p.eps);
        const double ak = gam / std::sqrt(vk + p.eps);
        if (all_drop[size_t(k)]) {
          // y_k is the bias alone: its variance is exactly 0 and BN outputs `shift`. (The
          // algebra's rounding noise in u - d would otherwise be amplified by 1/sqrt(eps).)
          if (p.post == Post::Relu) {
            A[size_t(k * O + o)] = 0.f;
            B[size_t(k * O + o)] = p.shift[o];
          } else {
            acc[size_t(k * O + o)] = a * a * Pd * vy;
          }
          continue;
        }
        if (p.post == Post::Relu) {
          A[size_t(k * O + o)] = float(ak);
          B[size_t(k * O + o)] = float(ak * st[0] + double(p.shift[o]));
          continue;
        }
        double dmg;
        if (std::abs(ak) <= 2.0 * std::abs(a)) {
          dmg = (ak - a) * (ak - a) * Pd * vy - 2.0 * ak * (ak - a) * st[2] + ak * ak * st[1];
        } else {
          dmg = ak * ak * st[3] - 2.0 * a * ak * (Pd * vy - st[2]) + a * a * Pd * vy;
        }
        acc[size_t(k * O + o)] = dmg < 0.0 ? 0.0 : dmg;  // keeps NaN
      }
    }
    if (p.post == Post::Relu) {
      // Pass 2: v = a_k (u - d) + (a_k mean d + shift), clipped, against relu(a u + shift).
      ReluPassArgs ra;
      ra.centre = mean_y.data();
      ra.base_scale = base_a.data();
      ra.base_shift = p.shift;
      ra.mask_scale = A.data();
      ra.mask_shift = B.data();
      ra.acc = acc.data();
      relu_pass(p, ra, pfor);
    }
  }
  sum_damage(p, acc);
}

void masked_relu_damage(const MaskedDamageParams& p, const MaskedAffine& m,
                        const ParallelFor& pfor) {
  if (nothing_to_price(p)) return;
  std::vector<double> acc(size_t(p.K * p.g.O), 0.0);
  // One ReLU pass: w = y - centre, base = relu(scale w + shift), each mask's
  // relu(mask_scale (w - d) + mask_shift) against it.
  ReluPassArgs ra;
  ra.centre = m.centre;
  ra.base_scale = p.scale;
  ra.base_shift = p.shift;
  ra.mask_scale = m.scale;
  ra.mask_shift = m.shift;
  ra.acc = acc.data();
  relu_pass(p, ra, pfor);
  sum_damage(p, acc);
}

}  // namespace cpu
}  // namespace aofp
