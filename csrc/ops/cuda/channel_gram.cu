// channel_gram and quadratic_damage: CUDA glue (the same checks as the CPU glue).
#include <torch/library.h>

#include "ops/cuda/cuda_glue.h"

namespace aofp {
namespace glue {
namespace {

at::Tensor channel_gram_cuda(const at::Tensor& x, const at::Tensor& weight,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, const c10::optional<at::Tensor>& scale) {
  cuda_glue::check_cuda("channel_gram", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  ChannelGramInputs in = prepare_channel_gram(x, weight, stride, padding, dilation, scale);
  if (in.empty) return in.out;
  const aofp::cuda::Budget budget = cuda_glue::budget();
  const size_t bytes = aofp::cuda::channel_gram_workspace_bytes(in.p, budget);
  at::Tensor ws = cuda_glue::workspace(bytes, x);
  C10_CUDA_CHECK(aofp::cuda::channel_gram(in.p, ws.data_ptr(), bytes, budget,
                                          cuda_glue::current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return in.out;
}

at::Tensor quadratic_damage_cuda(const at::Tensor& gram, const at::Tensor& masks) {
  cuda_glue::check_cuda("quadratic_damage", gram, "gram");
  const c10::cuda::CUDAGuard guard(gram.device());
  QuadraticDamageInputs in = prepare_quadratic_damage(gram, masks);
  if (in.empty) return in.out;
  C10_CUDA_CHECK(aofp::cuda::quadratic_damage(in.p, cuda_glue::current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return in.out;
}

}  // namespace
}  // namespace glue
}  // namespace aofp

TORCH_LIBRARY_IMPL(aofp, CUDA, m) {
  m.impl("channel_gram", &aofp::glue::channel_gram_cuda);
  m.impl("quadratic_damage", &aofp::glue::quadratic_damage_cuda);
}
