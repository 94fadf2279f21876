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
                             c10::string_view post, const c10::optional<at::Tensor>& output) {
  MaskedDamageInputs in = prepare_masked_damage(x, weight, masks, bias, stride, padding,
                                                dilation, norm, scale, shift, eps, post);
  prepare_output("masked_damage", x, in, output);
  at::Tensor out = at::zeros({in.p.K}, x.options().dtype(at::kFloat));
  const ConvGeom& g = in.p.g;
  if (in.p.K == 0 || g.positions() == 0 || g.C == 0 || g.O == 0) return out;
  in.fill_pointers();
  in.p.damage = out.data_ptr<float>();
  cpu::masked_damage(in.p, aten_parallel_for());
  return out;
}

// (K, O) per-mask affine coefficients, float32 contiguous.
at::Tensor prepare_per_mask(const char* op, const at::Tensor& t, const char* name, int64_t K,
                            int64_t O, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == K && t.size(1) == O, op, ": ", name,
              " must be (K, O) = (", K, ", ", O, ") (one value per mask and output channel), "
              "got shape ", shape_str(t));
  check_floating(op, t, name);
  check_same_device(op, x, "x", t, name);
  return t.to(at::kFloat).contiguous();
}

at::Tensor masked_relu_damage_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& masks, const at::Tensor& mask_scale,
                                  const at::Tensor& mask_shift, const at::Tensor& centre,
                                  const at::Tensor& scale, const at::Tensor& shift,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  const c10::optional<at::Tensor>& output) {
  const char* op = "masked_relu_damage";
  MaskedDamageInputs in = prepare_masked_damage(x, weight, masks, bias, stride, padding,
                                                dilation, "affine", scale, shift, 0.0, "relu", op);
  prepare_output(op, x, in, output);
  const int64_t K = in.p.K, O = in.p.g.O;
  const at::Tensor a = prepare_per_mask(op, mask_scale, "mask_scale", K, O, x);
  const at::Tensor b = prepare_per_mask(op, mask_shift, "mask_shift", K, O, x);
  TORCH_CHECK(centre.dim() == 1 && centre.size(0) == O, op, ": centre must be 1-D of size O = ",
              O, " (the follower's output channels), got shape ", shape_str(centre));
  check_floating(op, centre, "centre");
  check_same_device(op, x, "x", centre, "centre");
  const at::Tensor c = centre.to(at::kDouble).contiguous();
  at::Tensor out = at::zeros({K}, x.options().dtype(at::kFloat));
  const ConvGeom& g = in.p.g;
  if (K == 0 || g.positions() == 0 || g.C == 0 || O == 0) return out;
  in.fill_pointers();
  in.p.damage = out.data_ptr<float>();
  MaskedAffine m;
  m.scale = a.data_ptr<float>();
  m.shift = b.data_ptr<float>();
  m.centre = c.data_ptr<double>();
  cpu::masked_relu_damage(in.p, m, aten_parallel_for());
  return out;
}

}  // namespace
}  // namespace glue
}  // namespace aofp

TORCH_LIBRARY_IMPL(aofp, CPU, m) {
  m.impl("masked_damage", &aofp::glue::masked_damage_cpu);
  m.impl("masked_relu_damage", &aofp::glue::masked_relu_damage_cpu);
}
