// masked_damage: CPU glue.
#include <torch/library.h>

#include "ops/common.h"

namespace aofp {
namespace glue {
namespace {

at::Tensor masked_damage_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& masks, const c10::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, c10::string_view norm,
                             const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, double eps,
                             c10::string_view post) {
  MaskedDamageInputs in = prepare_masked_damage(x, weight, masks, bias, stride, padding,
                                                dilation, norm, scale, shift, eps, post);
  at::Tensor out = at::zeros({in.p.K}, x.options().dtype(at::kFloat));
  const ConvGeom& g = in.p.g;
  if (in.p.K == 0 || g.positions() == 0 || g.C == 0 || g.O == 0) return out;
  in.fill_pointers();
  in.p.damage = out.data_ptr<float>();
  cpu::masked_damage(in.p, aten_parallel_for());
  return out;
}

}  // namespace
}  // namespace glue
}  // namespace aofp

TORCH_LIBRARY_IMPL(aofp, CPU, m) { m.impl("masked_damage", &aofp::glue::masked_damage_cpu); }
