// The schemas of every aofp op, defined once. Backends register in csrc/ops/*.
#include <torch/library.h>

TORCH_LIBRARY(aofp, m) {
  m.def(
      "masked_damage(Tensor x, Tensor weight, Tensor masks, *, Tensor? bias=None, "
      "int[2] stride=1, int[2] padding=0, int[2] dilation=1, str norm=\"none\", "
      "Tensor? scale=None, Tensor? shift=None, float eps=1e-05, str post=\"none\", "
      "Tensor? output=None) -> Tensor");
  m.def(
      "masked_relu_damage(Tensor x, Tensor weight, Tensor masks, Tensor mask_scale, "
      "Tensor mask_shift, Tensor centre, Tensor scale, Tensor shift, *, Tensor? bias=None, "
      "int[2] stride=1, int[2] padding=0, int[2] dilation=1, Tensor? output=None) -> Tensor");
  m.def(
      "channel_gram(Tensor x, Tensor weight, *, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, Tensor? scale=None) -> Tensor");
  m.def("quadratic_damage(Tensor gram, Tensor masks) -> Tensor");
  m.def("output_grams(Tensor blocks, Tensor weight) -> Tensor");
  m.def("gram_forms(Tensor grams, Tensor masks) -> Tensor");
  m.def("compact_(Tensor(a!)[] tensors, int[] dims, Tensor keep) -> ()");
}
