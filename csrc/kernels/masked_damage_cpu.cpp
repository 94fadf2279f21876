// masked_damage on the CPU: the damage of K channel masks at a follower's output.
//
// Algebra (docs/kernels.md): the follower output with mask k is y_k = y - d_k, where
// d_k = sum over the channels c that mask k removes of z_c = conv(x[:, c], W[:, c]). The mask
// pass (mask_pass_cpu.cpp) computes the contributions once per tile and reduces every mask's
// d_k at once with the epilogue of the mode:
//   norm none/affine, post none: scale^2 sum d^2;
//   post relu: sum (relu(A (w - d) + B) - relu(a w + b))^2;
//   norm batch: per (k, o) the mean of d and the centred moments M2(d), C(u, d), M2(u - d)
//     with u = y - mean(y) (centred moments do not depend on where u is centred, so the pass
//     reads y itself), and per o the mean and M2 of y. For post = "none" the damage follows
//     in closed form here; for post = "relu" a second pass applies each mask's own
//     normalisation and clips.
#include <cmath>
#include <vector>

#include "kernels/cpu_common.h"
#include "kernels/mask_pass.h"

namespace aofp {
namespace cpu {

namespace {

// Per mask: removes at least one channel; removes every channel.
struct MaskKinds {
  std::vector<uint8_t> removes, all_drop;
};

MaskKinds mask_kinds(const MaskedDamageParams& p) {
  const int64_t C = p.g.C;
  MaskKinds mk;
  mk.removes.assign(size_t(p.K), 0);
  mk.all_drop.assign(size_t(p.K), 0);
  for (int64_t k = 0; k < p.K; ++k) {
    int64_t kept = 0;
    for (int64_t c = 0; c < C; ++c) kept += p.masks[k * C + c] ? 1 : 0;
    mk.removes[size_t(k)] = kept < C;
    mk.all_drop[size_t(k)] = kept == 0;
  }
  return mk;
}

// Zeroes the damage; true when there is nothing to price (the zeros are the answer).
bool nothing_to_price(const MaskedDamageParams& p) {
  for (int64_t k = 0; k < p.K; ++k) p.damage[k] = 0.f;
  return p.K == 0 || p.g.positions() == 0 || p.g.O == 0 || p.g.C == 0;
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

  const MaskKinds mk = mask_kinds(p);
  std::vector<float> ones(size_t(O), 1.f), zeros(size_t(O), 0.f);

  std::vector<double> acc;
  if (p.norm != Norm::Batch) {
    acc.assign(size_t(K * O), 0.0);
    MaskPassArgs ma;
    ma.epilogue = p.post == Post::Relu ? Epilogue::Relu : Epilogue::Square;
    ma.base_scale = p.norm == Norm::None ? ones.data() : p.scale;
    ma.base_shift = p.norm == Norm::None ? zeros.data() : p.shift;
    ma.acc = acc.data();
    mask_pass(p, ma, pfor);
  } else {
    // One pass: per (k, o) centred moments of d and of u - d, and per o the mean and M2 of y.
    std::vector<double> ystat(static_cast<size_t>(2 * O), 0.0);
    std::vector<double> mom(static_cast<size_t>(K * O * 4), 0.0);
    MaskPassArgs ms;
    ms.epilogue = Epilogue::BnStats;
    ms.acc = mom.data();
    ms.ystat = ystat.data();
    mask_pass(p, ms, pfor);
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
      if (!mk.removes[size_t(k)]) continue;  // removes nothing: damage 0
      for (int64_t o = 0; o < O; ++o) {
        const double* st = mom.data() + (k * O + o) * 4;
        const double gam = p.scale[o], vy = var_y[size_t(o)];
        const double vk = st[3] / Pd;
        const double a = gam / std::sqrt(vy + p.eps);
        const double ak = gam / std::sqrt(vk + p.eps);
        if (mk.all_drop[size_t(k)]) {
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
      MaskPassArgs ra;
      ra.epilogue = Epilogue::Relu;
      ra.centre = mean_y.data();
      ra.base_scale = base_a.data();
      ra.base_shift = p.shift;
      ra.mask_scale = A.data();
      ra.mask_shift = B.data();
      ra.acc = acc.data();
      mask_pass(p, ra, pfor);
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
  MaskPassArgs ra;
  ra.epilogue = Epilogue::Relu;
  ra.centre = m.centre;
  ra.base_scale = p.scale;
  ra.base_shift = p.shift;
  ra.mask_scale = m.scale;
  ra.mask_shift = m.shift;
  ra.acc = acc.data();
  mask_pass(p, ra, pfor);
  sum_damage(p, acc);
}

}  // namespace cpu
}  // namespace aofp
