// The mask pass of the CPU masked_damage kernels (mask_pass_cpu.cpp): per output channel o and
// mask k, one reduction over the positions of d_k = the contributions of the channels mask k
// removes, with one of three epilogues. Shared by masked_damage and masked_relu_damage.
#pragma once

#include "kernels/kernels.h"

namespace aofp {
namespace cpu {

enum class Epilogue {
  Square,   // acc[k, o] += s_o^2 sum d_k^2               (s = base_scale, or 1 without it)
  Relu,     // acc[k, o] += sum (relu(A (w - d_k) + B) - relu(a w + b))^2, w = y - centre
  BnStats,  // acc[(k, o), 0..3] = mean d_k, M2(d_k), C(y, d_k), M2(y - d_k) (centred sums)
            // and ystat[o, 0..1] = mean y, M2(y), over all positions (merged with Chan's rule)
};

struct MaskPassArgs {
  Epilogue epilogue = Epilogue::Square;
  const double* centre = nullptr;      // Relu: (O) subtracted from y, or nullptr (none)
  const float* base_scale = nullptr;   // Square / Relu: (O) a, or nullptr (1; Square only)
  const float* base_shift = nullptr;   // Relu: (O) b
  const float* mask_scale = nullptr;   // Relu: (K, O) A per mask, or nullptr (A = a)
  const float* mask_shift = nullptr;   // Relu: (K, O) B per mask, or nullptr (B = b)
  double* acc = nullptr;               // Square / Relu: (K, O), added to; BnStats: (K, O, 4)
  double* ystat = nullptr;             // BnStats: (O, 2)
};

// y = conv(x) + bias; masks that remove nothing leave their acc entries untouched.
void mask_pass(const MaskedDamageParams& p, const MaskPassArgs& a, const ParallelFor& pfor);

}  // namespace cpu
}  // namespace aofp
