// Shared ATen glue: argument checks with clear messages, and the preparation of the kernel
// parameter structs. Used by the CPU glue (csrc/ops/*.cpp) and the CUDA glue (csrc/ops/cuda/*).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace aofp {
namespace glue {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// at::parallel_for as the kernels' ParallelFor.
inline ParallelFor aten_parallel_for() {
  return [](int64_t begin, int64_t end, int64_t grain,
            const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(b, e); });
  };
}

inline void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name,
                              const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
              t.scalar_type());
}

// masks: (K, C) bool, or uint8 holding only 0 and 1. Returns contiguous uint8 (1 = keep).
inline at::Tensor prepare_masks(const char* op, const at::Tensor& masks, int64_t C,
                                const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(masks.dim() == 2, op, ": masks must be 2-D (K, C) with C = ", C,
              ", got shape ", shape_str(masks));
  TORCH_CHECK(masks.size(1) == C, op, ": masks must be (K, C) with C = ", C,
              " (the channels of ", ref_name, "), got shape ", shape_str(masks));
  TORCH_CHECK(masks.scalar_type() == at::kBool || masks.scalar_type() == at::kByte, op,
              ": masks must be bool (True = keep) or uint8 holding 0/1, got ",
              masks.scalar_type());
  check_same_device(op, ref, ref_name, masks, "masks");
  if (masks.scalar_type() == at::kByte && masks.numel() > 0) {
    TORCH_CHECK(masks.max().item<uint8_t>() <= 1, op,
                ": uint8 masks must hold only 0 and 1 (found a value > 1); use a bool tensor");
  }
  return masks.contiguous().view(at::kByte);
}

inline at::Tensor prepare_vector(const char* op, const c10::optional<at::Tensor>& t,
                                 const char* name, int64_t O, const at::Tensor& ref) {
  const at::Tensor& v = *t;
  TORCH_CHECK(v.dim() == 1 && v.size(0) == O, op, ": ", name, " must be 1-D of size O = ", O,
              " (the follower's output channels), got shape ", shape_str(v));
  check_floating(op, v, name);
  check_same_device(op, ref, "x", v, name);
  return v.to(at::kFloat).contiguous();
}

// The follower geometry from x, weight and conv arguments; checks every shape.
inline ConvGeom make_geometry(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 || x.dim() == 2, op,
              ": x must be (N, C, H, W) for a conv follower or (N, C) for a Linear follower, "
              "got shape ", shape_str(x));
  if (x.dim() == 4) {
    TORCH_CHECK(weight.dim() == 4, op,
                ": weight must be (O, C, kh, kw) when x is (N, C, H, W), got shape ",
                shape_str(weight));
  } else {
    TORCH_CHECK(weight.dim() == 2, op, ": weight must be (O, C) when x is (N, C), got shape ",
                shape_str(weight));
  }
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight must be (O, C, ...) with C = ",
              x.size(1), " (the channels of x); got weight shape ", shape_str(weight),
              " and x shape ", shape_str(x),
              " (grouped/depthwise followers are not supported)");
  check_floating(op, x, "x");
  check_floating(op, weight, "weight");
  check_same_device(op, x, "x", weight, "weight");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must each have 2 values");

  ConvGeom g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.O = weight.size(0);
  if (x.dim() == 4) {
    TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
    TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ",
                dilation);
    TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ",
                padding);
    g.H = x.size(2);
    g.W = x.size(3);
    g.KH = weight.size(2);
    g.KW = weight.size(3);
    g.stride_h = stride[0];
    g.stride_w = stride[1];
    g.pad_h = padding[0];
    g.pad_w = padding[1];
    g.dil_h = dilation[0];
    g.dil_w = dilation[1];
    const int64_t eh = g.H + 2 * g.pad_h - g.dil_h * (g.KH - 1) - 1;
    const int64_t ew = g.W + 2 * g.pad_w - g.dil_w * (g.KW - 1) - 1;
    TORCH_CHECK(g.KH >= 1 && g.KW >= 1 && eh >= 0 && ew >= 0, op,
                ": the kernel (", g.KH, "x", g.KW, ", dilation ", dilation,
                ") does not fit the padded input (", g.H, "x", g.W, ", padding ", padding,
                "): the follower output would be empty");
    g.HO = eh / g.stride_h + 1;
    g.WO = ew / g.stride_w + 1;
    for (int i = 0; i < 4; ++i) g.xs[i] = x.stride(i);
  } else {
    TORCH_CHECK(stride[0] == 1 && stride[1] == 1 && padding[0] == 0 && padding[1] == 0 &&
                    dilation[0] == 1 && dilation[1] == 1,
                op, ": stride, padding and dilation apply to conv followers only; "
                "leave them at 1, 0, 1 for a Linear follower (x of shape (N, C))");
    g.xs[0] = x.stride(0);
    g.xs[1] = x.stride(1);
  }
  return g;
}

inline Norm parse_norm(const char* op, c10::string_view norm) {
  if (norm == "none") return Norm::None;
  if (norm == "affine") return Norm::Affine;
  if (norm == "batch") return Norm::Batch;
  TORCH_CHECK(false, op, ": norm must be \"none\", \"affine\" or \"batch\", got \"",
              std::string(norm), "\"");
  return Norm::None;
}

inline Post parse_post(const char* op, c10::string_view post) {
  if (post == "none") return Post::None;
  if (post == "relu") return Post::Relu;
  TORCH_CHECK(false, op, ": post must be \"none\" or \"relu\", got \"", std::string(post), "\"");
  return Post::None;
}

// Everything masked_damage's kernels need, checked and converted (float32; x keeps its strides).
struct MaskedDamageInputs {
  at::Tensor x, weight, bias, masks, scale, shift, y;
  MaskedDamageParams p;  // pointers are filled by fill_pointers()
  void fill_pointers() {
    p.y = y.defined() ? y.data_ptr<float>() : nullptr;
    p.x = x.data_ptr<float>();
    p.weight = weight.data_ptr<float>();
    p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    p.masks = masks.data_ptr<uint8_t>();
    p.scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
    p.shift = shift.defined() ? shift.data_ptr<float>() : nullptr;
  }
};

inline MaskedDamageInputs prepare_masked_damage(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& masks,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, c10::string_view norm, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, double eps, c10::string_view post,
    const char* op = "masked_damage") {
  MaskedDamageInputs in;
  in.p.g = make_geometry(op, x, weight, stride, padding, dilation);
  const int64_t O = in.p.g.O;
  in.p.norm = parse_norm(op, norm);
  in.p.post = parse_post(op, post);
  in.masks = prepare_masks(op, masks, in.p.g.C, x, "x");
  in.p.K = masks.size(0);
  if (bias.has_value() && bias->defined()) in.bias = prepare_vector(op, bias, "bias", O, x);
  const bool has_scale = scale.has_value() && scale->defined();
  const bool has_shift = shift.has_value() && shift->defined();
  if (in.p.norm == Norm::None) {
    TORCH_CHECK(!has_scale && !has_shift, op,
                ": scale/shift were given but norm=\"none\"; pass norm=\"affine\" or \"batch\"");
  } else {
    TORCH_CHECK(has_scale && has_shift, op, ": norm=\"",
                (in.p.norm == Norm::Affine ? "affine" : "batch"),
                "\" needs scale and shift, each of shape (O,) = (", O, ",)");
    in.scale = prepare_vector(op, scale, "scale", O, x);
    in.shift = prepare_vector(op, shift, "shift", O, x);
  }
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  in.p.eps = eps;
  in.x = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  for (int i = 0; i < x.dim(); ++i) in.p.g.xs[i] = in.x.stride(i);
  in.weight = weight.to(at::kFloat).contiguous();
  return in;
}

// The optional `output` (the follower's output as the forward computed it): checked against the
// geometry of `in`; true when given.
inline bool check_output(const char* op, const at::Tensor& x, const MaskedDamageInputs& in,
                         const c10::optional<at::Tensor>& output) {
  if (!output.has_value() || !output->defined()) return false;
  const at::Tensor& y = *output;
  const ConvGeom& g = in.p.g;
  const bool ok = x.dim() == 2 ? (y.dim() == 2 && y.size(0) == g.N && y.size(1) == g.O)
                               : (y.dim() == 4 && y.size(0) == g.N && y.size(1) == g.O &&
                                  y.size(2) == g.HO && y.size(3) == g.WO);
  TORCH_CHECK(ok, op, ": output must be the follower's output, of shape (", g.N, ", ", g.O,
              x.dim() == 2 ? "" : (", " + std::to_string(g.HO) + ", " + std::to_string(g.WO)),
              "), got shape ", shape_str(y));
  check_floating(op, y, "output");
  check_same_device(op, x, "x", y, "output");
  return true;
}

// The CPU mask pass's copy of `output`: y[o * y_ld + q] = output[n, o, ho, wo] - bias[o] at
// position q = (n, ho, wo), zero past O (to whole blocks of 4) and past P (to whole tiles).
inline void prepare_output(const char* op, const at::Tensor& x, MaskedDamageInputs& in,
                           const c10::optional<at::Tensor>& output) {
  if (!check_output(op, x, in, output)) return;
  const ConvGeom& g = in.p.g;
  const int64_t O = g.O, P = g.positions();
  const int64_t ld = (P + 31) / 32 * 32, rows = (O + 3) / 4 * 4;
  at::Tensor y = output->to(at::kFloat);
  y = x.dim() == 2 ? y.t() : y.reshape({g.N, O, -1}).permute({1, 0, 2}).reshape({O, P});
  if (in.bias.defined()) y = y - in.bias.view({O, 1});
  in.y = at::zeros({rows, ld}, x.options().dtype(at::kFloat));
  in.y.narrow(0, 0, O).narrow(1, 0, P).copy_(y);
  in.p.y_ld = ld;
}

// channel_gram: checked inputs and the params struct, with the output allocated (zeros).
// `empty` is true when there is nothing to compute (the zeros are the answer).
struct ChannelGramInputs {
  at::Tensor x, weight, scale, out;
  ChannelGramParams p;
  bool empty = false;
};

inline ChannelGramInputs prepare_channel_gram(const at::Tensor& x, const at::Tensor& weight,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation,
                                              const c10::optional<at::Tensor>& scale) {
  const char* op = "channel_gram";
  ChannelGramInputs in;
  in.p.g = make_geometry(op, x, weight, stride, padding, dilation);
  if (scale.has_value() && scale->defined())
    in.scale = prepare_vector(op, scale, "scale", in.p.g.O, x);
  in.x = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  for (int i = 0; i < in.x.dim(); ++i) in.p.g.xs[i] = in.x.stride(i);
  in.weight = weight.to(at::kFloat).contiguous();
  in.out = at::zeros({in.p.g.C, in.p.g.C}, x.options().dtype(at::kFloat));
  in.empty = in.p.g.C == 0 || in.p.g.positions() == 0 || in.p.g.O == 0;
  if (!in.empty) {
    in.p.x = in.x.data_ptr<float>();
    in.p.weight = in.weight.data_ptr<float>();
    in.p.scale = in.scale.defined() ? in.scale.data_ptr<float>() : nullptr;
    in.p.gram = in.out.data_ptr<float>();
  }
  return in;
}

// quadratic_damage: checked inputs and the params struct, with the output allocated (zeros).
struct QuadraticDamageInputs {
  at::Tensor gram, masks, out;
  QuadraticDamageParams p;
  bool empty = false;
};

inline QuadraticDamageInputs prepare_quadratic_damage(const at::Tensor& gram,
                                                      const at::Tensor& masks) {
  const char* op = "quadratic_damage";
  TORCH_CHECK(gram.dim() == 2 && gram.size(0) == gram.size(1), op,
              ": gram must be a square (C, C) matrix, got shape ", shape_str(gram));
  check_floating(op, gram, "gram");
  QuadraticDamageInputs in;
  in.masks = prepare_masks(op, masks, gram.size(0), gram, "gram");
  in.gram = gram.to(at::kFloat).contiguous();
  in.out = at::zeros({masks.size(0)}, gram.options().dtype(at::kFloat));
  in.empty = masks.size(0) == 0 || gram.size(0) == 0;
  if (!in.empty) {
    in.p.gram = in.gram.data_ptr<float>();
    in.p.C = gram.size(0);
    in.p.masks = in.masks.data_ptr<uint8_t>();
    in.p.K = masks.size(0);
    in.p.damage = in.out.data_ptr<float>();
  }
  return in;
}

// output_grams: checked inputs and the params struct, with the output allocated.
struct OutputGramsInputs {
  at::Tensor blocks, wt, out;
  OutputGramsParams p;
  bool empty = false;
};

inline OutputGramsInputs prepare_output_grams(const at::Tensor& blocks, const at::Tensor& weight) {
  const char* op = "output_grams";
  TORCH_CHECK(blocks.dim() == 4 && blocks.size(0) == blocks.size(1) &&
                  blocks.size(2) == blocks.size(3),
              op, ": blocks must be (T, T, C, C) tap blocks, got shape ", shape_str(blocks));
  check_floating(op, blocks, "blocks");
  check_floating(op, weight, "weight");
  check_same_device(op, blocks, "blocks", weight, "weight");
  const int64_t T = blocks.size(0), C = blocks.size(2);
  TORCH_CHECK(weight.dim() == 4 || weight.dim() == 2, op,
              ": weight must be a conv weight (O, C, kh, kw) or a Linear weight (O, C), got shape ",
              shape_str(weight));
  const int64_t taps = weight.dim() == 4 ? weight.size(2) * weight.size(3) : 1;
  TORCH_CHECK(weight.size(1) == C && taps == T, op, ": weight must have C = ", C,
              " input channels and kh * kw = T = ", T, " taps (blocks ", shape_str(blocks),
              "), got shape ", shape_str(weight));
  const int64_t O = weight.size(0);
  OutputGramsInputs in;
  in.blocks = blocks.to(at::kFloat).permute({2, 3, 0, 1}).contiguous();   // (C, C, T, T)
  // the weight in blocks of B output channels, zero-padded: (ceil(O / B), C, T, B)
  const int64_t B = kOutputGramsBlock, nb = (O + B - 1) / B;
  in.wt = at::zeros({nb * B, C, T}, blocks.options().dtype(at::kFloat));
  in.wt.narrow(0, 0, O).copy_(weight.reshape({O, C, T}));
  in.wt = in.wt.view({nb, B, C, T}).permute({0, 2, 3, 1}).contiguous();
  in.out = at::empty({C, C, O}, blocks.options().dtype(at::kFloat));   // every entry written
  in.empty = C == 0 || O == 0;
  if (!in.empty) {
    in.p.blocks = in.blocks.data_ptr<float>();
    in.p.wt = in.wt.data_ptr<float>();
    in.p.T = T;
    in.p.C = C;
    in.p.O = O;
    in.p.grams = in.out.data_ptr<float>();
  }
  return in;
}

// gram_forms: checked inputs and the params struct, with the output allocated (zeros).
struct GramFormsInputs {
  at::Tensor grams, masks, out;
  GramFormsParams p;
  bool empty = false;
};

inline GramFormsInputs prepare_gram_forms(const at::Tensor& grams, const at::Tensor& masks) {
  const char* op = "gram_forms";
  TORCH_CHECK(grams.dim() == 3 && grams.size(0) == grams.size(1), op,
              ": grams must be (C, C, O), got shape ", shape_str(grams));
  check_floating(op, grams, "grams");
  const int64_t C = grams.size(0), O = grams.size(2);
  GramFormsInputs in;
  in.masks = prepare_masks(op, masks, C, grams, "grams");
  in.grams = grams.to(at::kFloat).contiguous();
  in.out = at::zeros({masks.size(0), O}, grams.options().dtype(at::kDouble));
  in.empty = masks.size(0) == 0 || O == 0 || C == 0;
  if (!in.empty) {
    in.p.grams = in.grams.data_ptr<float>();
    in.p.C = C;
    in.p.O = O;
    in.p.masks = in.masks.data_ptr<uint8_t>();
    in.p.K = masks.size(0);
    in.p.forms = in.out.data_ptr<double>();
  }
  return in;
}

}  // namespace glue
}  // namespace aofp
