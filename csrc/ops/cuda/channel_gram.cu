// channel_gram and quadratic_damage: CUDA glue (the same checks as the CPU glue).
#include <torch/library.h>

#include "ops/cuda/cuda_glue.h"

namespace aofp {
namespace glue {
namespace {

at::Tensor channel_gram_cuda(const at::Tensor& x, const at::Tensor& weight,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, const c10::optional<at::Tensor>& scale) {
  const char* op = "channel_gram";
  cuda_glue::check_cuda(op, x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  ChannelGramParams p;
  p.g = make_geometry(op, x, weight, stride, padding, dilation);
  at::Tensor s;
  if (scale.has_value() && scale->defined()) s = prepare_vector(op, scale, "scale", p.g.O, x);
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  for (int i = 0; i < xf.dim(); ++i) p.g.xs[i] = xf.stride(i);
  const at::Tensor wf = weight.to(at::kFloat).contiguous();
  at::Tensor out = at::zeros({p.g.C, p.g.C}, x.options().dtype(at::kFloat));
  if (p.g.C == 0 || p.g.positions() == 0 || p.g.O == 0) return out;
  p.x = xf.data_ptr<float>();
  p.weight = wf.data_ptr<float>();
  p.scale = s.defined() ? s.data_ptr<float>() : nullptr;
  p.gram = out.data_ptr<float>();
  const aofp::cuda::Budget budget = cuda_glue::budget();
  const size_t bytes = aofp::cuda::channel_gram_workspace_bytes(p, budget);
  at::Tensor ws = cuda_glue::workspace(bytes, x);
  C10_CUDA_CHECK(aofp::cuda::channel_gram(p, ws.data_ptr(), bytes, budget,
                                          cuda_glue::current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor quadratic_damage_cuda(const at::Tensor& gram, const at::Tensor& masks) {
  const char* op = "quadratic_damage";
  cuda_glue::check_cuda(op, gram, "gram");
  const c10::cuda::CUDAGuard guard(gram.device());
  TORCH_CHECK(gram.dim() == 2 && gram.size(0) == gram.size(1), op,
              ": gram must be a square (C, C) matrix, got shape ", shape_str(gram));
  check_floating(op, gram, "gram");
  const at::Tensor m = prepare_masks(op, masks, gram.size(0), gram, "gram");
  const at::Tensor gf = gram.to(at::kFloat).contiguous();
  at::Tensor out = at::zeros({masks.size(0)}, gram.options().dtype(at::kFloat));
  if (masks.size(0) == 0 || gram.size(0) == 0) return out;
  QuadraticDamageParams p;
  p.gram = gf.data_ptr<float>();
  p.C = gram.size(0);
  p.masks = m.data_ptr<uint8_t>();
  p.K = masks.size(0);
  p.damage = out.data_ptr<float>();
  C10_CUDA_CHECK(aofp::cuda::quadratic_damage(p, cuda_glue::current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace glue
}  // namespace aofp

TORCH_LIBRARY_IMPL(aofp, CUDA, m) {
  m.impl("channel_gram", &aofp::glue::channel_gram_cuda);
  m.impl("quadratic_damage", &aofp::glue::quadratic_damage_cuda);
}
