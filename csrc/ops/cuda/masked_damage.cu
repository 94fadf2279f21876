// masked_damage: CUDA glue (checks and conversions shared with the CPU glue in ops/common.h).
#include <torch/library.h>

#include "ops/cuda/cuda_glue.h"

namespace aofp {
namespace glue {
namespace {

at::Tensor masked_damage_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& masks, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, c10::string_view norm,
                              const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& shift, double eps,
                              c10::string_view post, const c10::optional<at::Tensor>& output) {
  cuda_glue::check_cuda("masked_damage", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  MaskedDamageInputs in = prepare_masked_damage(x, weight, masks, bias, stride, padding,
                                                dilation, norm, scale, shift, eps, post);
  // checked only: the CUDA kernel forms every channel's contributions itself
  check_output("masked_damage", x, in, output);
  at::Tensor out = at::zeros({in.p.K}, x.options().dtype(at::kFloat));
  const ConvGeom& g = in.p.g;
  if (in.p.K == 0 || g.positions() == 0 || g.C == 0 || g.O == 0) return out;
  in.fill_pointers();
  in.p.damage = out.data_ptr<float>();
  const aofp::cuda::Budget budget = cuda_glue::budget();
  const size_t bytes = aofp::cuda::masked_damage_workspace_bytes(in.p, budget);
  at::Tensor ws = cuda_glue::workspace(bytes, x);
  C10_CUDA_CHECK(aofp::cuda::masked_damage(in.p, ws.data_ptr(), bytes, budget,
                                           cuda_glue::current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace glue
}  // namespace aofp

TORCH_LIBRARY_IMPL(aofp, CUDA, m) { m.impl("masked_damage", &aofp::glue::masked_damage_cuda); }
