// channel_gram, quadratic_damage, output_grams and gram_forms: CPU glue.
#include <torch/library.h>

#include "ops/common.h"

namespace aofp {
namespace glue {
namespace {

at::Tensor channel_gram_cpu(const at::Tensor& x, const at::Tensor& weight,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, const c10::optional<at::Tensor>& scale) {
  ChannelGramInputs in = prepare_channel_gram(x, weight, stride, padding, dilation, scale);
  if (!in.empty) cpu::channel_gram(in.p, aten_parallel_for());
  return in.out;
}

at::Tensor quadratic_damage_cpu(const at::Tensor& gram, const at::Tensor& masks) {
  QuadraticDamageInputs in = prepare_quadratic_damage(gram, masks);
  if (!in.empty) cpu::quadratic_damage(in.p, aten_parallel_for());
  return in.out;
}

at::Tensor output_grams_cpu(const at::Tensor& blocks, const at::Tensor& weight) {
  OutputGramsInputs in = prepare_output_grams(blocks, weight);
  if (!in.empty) cpu::output_grams(in.p, aten_parallel_for());
  return in.out;
}

at::Tensor gram_forms_cpu(const at::Tensor& grams, const at::Tensor& masks) {
  GramFormsInputs in = prepare_gram_forms(grams, masks);
  if (!in.empty) cpu::gram_forms(in.p, aten_parallel_for());
  return in.out;
}

}  // namespace
}  // namespace glue
}  // namespace aofp

TORCH_LIBRARY_IMPL(aofp, CPU, m) {
  m.impl("channel_gram", &aofp::glue::channel_gram_cpu);
  m.impl("quadratic_damage", &aofp::glue::quadratic_damage_cpu);
  m.impl("output_grams", &aofp::glue::output_grams_cpu);
  m.impl("gram_forms", &aofp::glue::gram_forms_cpu);
}
