// The ReLU pass of the CPU masked_damage kernels (relu_pass_cpu.cpp), shared by
// masked_damage (post = "relu") and masked_relu_damage.
#pragma once

#include "kernels/kernels.h"

namespace aofp {
namespace cpu {

struct ReluPassArgs {
  const double* centre = nullptr;      // (O) subtracted from y, or nullptr (none)
  const float* base_scale = nullptr;   // (O) a: the unmasked output is relu(a w + b)
  const float* base_shift = nullptr;   // (O) b
  const float* mask_scale = nullptr;   // (K, O) A per mask, or nullptr (A = a)
  const float* mask_shift = nullptr;   // (K, O) B per mask, or nullptr (B = b)
  double* acc = nullptr;               // (K, O) damage sums, added to
};

// acc[k, o] += sum over positions of (relu(A (w - d_k) + B) - relu(a w + b))^2 with
// w = y - centre, y = conv(x) + bias and d_k the contributions of the channels mask k removes;
// masks that remove nothing add nothing.
void relu_pass(const MaskedDamageParams& p, const ReluPassArgs& a, const ParallelFor& pfor);

}  // namespace cpu
}  // namespace aofp
