// Torch-free kernel interface of aofp_ext: plain parameter structs over raw pointers.
// Nothing in csrc/kernels includes torch; the ATen glue in csrc/ops fills these structs.
#pragma once

#include <cstdint>
#include <functional>

namespace aofp {

enum class Norm : int32_t { None = 0, Affine = 1, Batch = 2 };
enum class Post : int32_t { None = 0, Relu = 1 };

// Geometry of a follower. A Linear follower is a 1x1 convolution over a 1x1 input.
struct ConvGeom {
  int64_t N = 0, C = 0, H = 1, W = 1;       // input x (N, C, H, W)
  int64_t O = 0, KH = 1, KW = 1;            // weight (O, C, KH, KW)
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
  int64_t HO = 1, WO = 1;                   // output spatial size
  int64_t xs[4] = {0, 0, 0, 0};             // element strides of x along N, C, H, W (any layout)

  int64_t positions() const { return N * HO * WO; }   // P: output positions per output channel
  int64_t taps() const { return KH * KW; }
};

// damage[k] = sum over (n, o, ho, wo) of (f(conv(x * masks[k])) - f(conv(x)))^2,
// f = norm then post. masks: (K, C) contiguous bytes, nonzero = keep the channel.
struct MaskedDamageParams {
  ConvGeom g;
  const float* x = nullptr;        // strided by g.xs
  const float* weight = nullptr;   // contiguous (O, C, KH, KW)
  const float* bias = nullptr;     // (O) or nullptr
  const uint8_t* masks = nullptr;  // contiguous (K, C)
  int64_t K = 0;
  Norm norm = Norm::None;
  Post post = Post::None;
  const float* scale = nullptr;    // (O); required unless norm == None
  const float* shift = nullptr;    // (O); required unless norm == None
  double eps = 1e-5;
  float* damage = nullptr;         // out (K)
  // Optional: the follower's output without bias, conv(x, W), as the forward computed it,
  // y[o * y_ld + q] for output channel o < ceil(O / 4) * 4 and position q < y_ld (zero past O
  // and past the positions; y_ld >= ceil(P / 32) * 32). With it the CPU mask pass reads y
  // instead of summing the contributions of the channels every mask keeps.
  const float* y = nullptr;
  int64_t y_ld = 0;
};

// masked_relu_damage: each mask normalises its output with its own affine of the centred output,
//   damage[k] = sum over (n, o, ho, wo) of (relu(A[k, o] (y_k - centre[o]) + B[k, o])
//                                           - relu(scale[o] (y - centre[o]) + shift[o]))^2,
// y = conv(x) + bias, y_k = conv(x * masks[k]) + bias; 0 for a mask that keeps every channel.
// With A, B and centre from BatchNorm's batch statistics of each masked output this is
// masked_damage's norm = batch, post = relu in one pass (the statistics come from elsewhere).
// MaskedDamageParams carries x, weight, bias, masks, the base scale/shift and damage.
struct MaskedAffine {
  const float* scale = nullptr;    // A: contiguous (K, O)
  const float* shift = nullptr;    // B: contiguous (K, O)
  const double* centre = nullptr;  // (O)
};

// gram[c, c'] = sum over (n, o, ho, wo) of scale[o]^2 * z_c * z_c', z_c = conv(x[:, c], W[:, c]).
struct ChannelGramParams {
  ConvGeom g;
  const float* x = nullptr;
  const float* weight = nullptr;   // contiguous (O, C, KH, KW)
  const float* scale = nullptr;    // (O) or nullptr (= ones)
  float* gram = nullptr;           // out (C, C), contiguous
};

// damage[k] = r_k^T G r_k with r_k = 1 - masks[k] (1 = channel removed).
struct QuadraticDamageParams {
  const float* gram = nullptr;     // contiguous (C, C)
  int64_t C = 0;
  const uint8_t* masks = nullptr;  // contiguous (K, C), nonzero = keep
  int64_t K = 0;
  float* damage = nullptr;         // out (K)
};

// The per-output-channel Grams of the contributions, from the im2col Gram's tap blocks:
//   grams[c, d, o] = sum over taps (t, u) of W[o, c, t] * blocks[t, u, c, d] * W[o, d, u].
// With blocks the (centred) Gram of the follower's im2col rows, grams[:, :, o] is the (centred)
// Gram of the contributions z_c = conv(x[:, c], W[o, c]) to output channel o.
constexpr int64_t kOutputGramsBlock = 32;   // output channels per block of wt
struct OutputGramsParams {
  const float* blocks = nullptr;   // contiguous (C, C, T, T): blocks[c, d, t, u]
  const float* wt = nullptr;       // contiguous (ceil(O / B), C, T, B), B = kOutputGramsBlock:
                                   // wt[o / B, c, t, o % B] = W[o, c, t], zero past O
  int64_t T = 0, C = 0, O = 0;
  float* grams = nullptr;          // out, contiguous (C, C, O)
};

// forms[k, o] = m_k^T grams[:, :, o] m_k with m_k the 0/1 vector masks[k] (nonzero = keep): the
// sum of grams[c, d, o] over the pairs (c, d) of kept channels, float32 over d, float64 over c.
// grams[:, :, o] is taken as symmetric: only its upper triangle (d >= c) is read.
struct GramFormsParams {
  const float* grams = nullptr;    // contiguous (C, C, O)
  int64_t C = 0, O = 0;
  const uint8_t* masks = nullptr;  // contiguous (K, C)
  int64_t K = 0;
  double* forms = nullptr;         // out, contiguous (K, O)
};

// In place: a buffer seen as (outer, size, inner) elements keeps the slices keep[0..n_keep) of
// its middle dimension and becomes (outer, n_keep, inner), packed from the start of the buffer.
// keep must be strictly increasing and < size (the glue checks).
struct CompactParams {
  void* data = nullptr;
  int64_t outer = 1, size = 0, inner = 1;
  int64_t elem_size = 4;           // bytes per element
  const int64_t* keep = nullptr;
  int64_t n_keep = 0;
};

// The glue supplies its thread pool: body(begin, end) is called on disjoint sub-ranges of
// [begin, end) that together cover it; calls may run concurrently.
using ParallelFor =
    std::function<void(int64_t begin, int64_t end, int64_t grain,
                       const std::function<void(int64_t, int64_t)>& body)>;

// A serial ParallelFor (for callers without a thread pool).
void serial_for(int64_t begin, int64_t end, int64_t grain,
                const std::function<void(int64_t, int64_t)>& body);

namespace cpu {
void masked_damage(const MaskedDamageParams& p, const ParallelFor& pfor);
void masked_relu_damage(const MaskedDamageParams& p, const MaskedAffine& m,
                        const ParallelFor& pfor);
void channel_gram(const ChannelGramParams& p, const ParallelFor& pfor);
void quadratic_damage(const QuadraticDamageParams& p, const ParallelFor& pfor);
void output_grams(const OutputGramsParams& p, const ParallelFor& pfor);
void gram_forms(const GramFormsParams& p, const ParallelFor& pfor);
void compact(const CompactParams& p);
}  // namespace cpu

}  // namespace aofp
