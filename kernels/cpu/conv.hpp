// 3-D convolutions on channels-last tensors: a naive reference and a fast oneDNN version with the same
// contract.
//
// Layouts (all row-major, last index fastest):
//   activations  x, y          (N, D, H, W, C)
//   conv3d weight w            (Cout, k, k, k, Cin)      -- cuDNN's KRSC ("odhwi" in oneDNN terms)
//   conv_transpose3d weight w  (Cin, 2, 2, 2, Cout)      -- the KRSC filter of the conv whose
//                                                         backward-data the transposed conv is
//   bias b                     (Cout)
// Output size of conv3d: o = (i + 2*pad - k) / stride + 1. conv_transpose3d has k = stride = 2, pad 0:
// o = 2 * i.
//
// Gradient rule: every backward ASSIGNS its outputs (dx, dw, db are overwritten, never accumulated).
// Callers that need accumulation add the result themselves.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "core/tensor.hpp"

namespace medseg::cpu {

struct ConvGeometry {
  int64_t n = 0, id = 0, ih = 0, iw = 0, cin = 0;  // input
  int64_t od = 0, oh = 0, ow = 0, cout = 0;        // output
  int k = 3, stride = 1, pad = 1;
  bool transposed = false;

  // Regular conv: k in {1, 3}, stride in {1, 2}; pad usually k/2.
  static ConvGeometry conv(const Shape& in, int64_t cout, int k, int stride, int pad);
  // Transposed conv with kernel 2, stride 2.
  static ConvGeometry transpose2(const Shape& in, int64_t cout);
  Shape in_shape() const { return Shape{n, id, ih, iw, cin}; }
  Shape out_shape() const { return Shape{n, od, oh, ow, cout}; }
  Shape weight_shape() const;
  // Multiply-adds x2 of one forward pass (the same for each backward pass).
  double flops() const;
  bool operator==(const ConvGeometry& o) const = default;
  // "conv k3 s1 p1 (2, 64, 64, 64, 16) -> (2, 64, 64, 64, 16)", for messages and benchmark tables.
  std::string str() const;
};

// Throws ArgumentError naming the input and output shapes when g is not what conv() / transpose2()
// would build (sizes, k, stride, pad). Every kernel below calls it before touching memory.
void validate(const ConvGeometry& g);
// For callers holding Tensors: validate(g), then check that x, w and y have g's input, weight and
// output shapes; throws ArgumentError naming the expected and the found shape.
void check_conv_shapes(const ConvGeometry& g, const Shape& x, const Shape& w, const Shape& y);

// ---- naive reference (double accumulation), the ground truth for every other implementation ----
void conv3d_forward_ref(const ConvGeometry& g, const float* x, const float* w, const float* b, float* y);
void conv3d_backward_data_ref(const ConvGeometry& g, const float* dy, const float* w, float* dx);
// db may be null.
void conv3d_backward_weights_ref(const ConvGeometry& g, const float* dy, const float* x, float* dw,
                                 float* db);

// ---- fast: oneDNN primitives cached per geometry, channels-last activations ----
// Valid for both g.transposed == false and true.
void conv3d_forward(const ConvGeometry& g, const float* x, const float* w, const float* b, float* y);
void conv3d_backward_data(const ConvGeometry& g, const float* dy, const float* w, float* dx);
void conv3d_backward_weights(const ConvGeometry& g, const float* dy, const float* x, float* dw,
                             float* db);
// y = LeakyReLU(conv3d(x, w) + b) with negative slope `slope`, the activation applied by oneDNN as
// a post-op while the output is still in registers: one pass over y instead of two (inference with
// normalization folded into the convolution). Regular convolutions only (not transposed). The
// reference is conv3d_forward_ref followed by leaky_relu_forward.
void conv3d_forward_leaky(const ConvGeometry& g, const float* x, const float* w, const float* b,
                          float* y, float slope);

// ---- direct backward-weights for AVX2 + FMA CPUs (conv_direct.cpp) ----
// Register-tiled (6 Cout x 16 or 12 x 8 Cin per tile), no reduction across threads (each dw tile has
// one owner, so the result does not depend on the thread count). Covers regular convolutions (any
// k, stride, pad) with Cin % 8 == 0 and Cout % 8 == 0, and k 3 / stride 1 / pad 1 convolutions with
// any Cin and Cout % 8 == 0 (the first layer: 6 (tap, input channel) pairs x 16 Cout per tile, fixed
// chunks summed in order), on CPUs with AVX2 and FMA: then it computes dw (and db when not null)
// and returns true; otherwise it returns false and touches nothing.
// conv3d_backward_weights uses it below AVX-512, where oneDNN 2.6's kernel is the slow pass.
bool conv3d_backward_weights_direct_covers(const ConvGeometry& g);
bool conv3d_backward_weights_direct(const ConvGeometry& g, const float* dy, const float* x, float* dw,
                                    float* db);

// ---- Winograd F(2x2x2, 3x3x3) for AVX2 + FMA CPUs (conv_winograd.cpp) ----
// 64 multiplications per 2x2x2 output block and channel pair instead of 216. Covers regular
// convolutions with k = 3, stride 1, pad 1, Cin % 8 == 0, Cout % 8 == 0 and Cin * Cout <= 128 * 128
// (beyond that the transformed weights no longer stay in cache and oneDNN is faster) on CPUs with
// AVX2 and FMA: then it computes the pass and returns true; otherwise it returns false and touches
// nothing. The forward optionally applies LeakyReLU (slope) after the bias. Each output element is
// computed by one thread in a fixed order (same bits for any thread count). conv3d_forward,
// conv3d_forward_leaky, conv3d_backward_data and conv3d_backward_weights use it below AVX-512
// (MEDSEG_CONV_WINOGRAD=0 keeps oneDNN and the direct kernels).
// All three passes come in two tile sizes: F(2x2x2, 3x3x3) and F(4x4x4, 3x3x3) (216
// multiplications per 4x4x4 block, 2.4x fewer again, with rounding errors ~10x F(2)'s, still below
// 1e-5 of max|y| up to 128 channels). Auto takes F(4) on volumes of at least 16^3 with
// Cin x Cout <= 64 x 64, F(2) elsewhere (MEDSEG_CONV_WINOGRAD_TILE=2 or 4 forces one).
enum class WinogradTile { Auto, F2, F4 };
bool conv3d_winograd_covers(const ConvGeometry& g);
bool conv3d_forward_winograd(const ConvGeometry& g, const float* x, const float* w, const float* b,
                             float* y, std::optional<float> leaky_slope = std::nullopt,
                             WinogradTile tile = WinogradTile::Auto);
bool conv3d_backward_data_winograd(const ConvGeometry& g, const float* dy, const float* w,
                                   float* dx, WinogradTile tile = WinogradTile::Auto);
// Backward-weights (and db when not null) by the transposed Winograd algorithm.
bool conv3d_backward_weights_winograd(const ConvGeometry& g, const float* dy, const float* x,
                                      float* dw, float* db, WinogradTile tile = WinogradTile::Auto);

// ---- direct transposed convolution (k = stride = 2) for AVX2 + FMA CPUs (conv_transposed.cpp) ----
// The forward writes each tap's output block in place (no GEMM temporary, no scatter);
// backward-weights reads them in place. Covers transposed geometries with Cout % 8 == 0 and
// Cin x Cout <= 2048 (beyond that the GEMM path is faster) on CPUs with AVX2 and FMA: then it
// computes and returns true; otherwise it returns false and touches nothing. The results do not
// depend on the thread count. Used below AVX-512 (MEDSEG_CONV_DIRECT=0 keeps the GEMM path).
bool conv_transpose2_direct_covers(const ConvGeometry& g);
bool conv_transpose2_forward_direct(const ConvGeometry& g, const float* x, const float* w,
                                    const float* b, float* y);
bool conv_transpose2_backward_weights_direct(const ConvGeometry& g, const float* dy,
                                             const float* x, float* dw, float* db);

// ---- direct backward-data of the stride-2 convolution (k = 3, pad = 1) for AVX2 + FMA CPUs ----
// (conv_strided.cpp) Needs Cin % 8 == 0 and Cin x Cout <= 2048 (beyond that oneDNN is faster);
// returns false and touches nothing when not covered (or without AVX2/FMA). The result does not
// depend on the thread count. The dispatch uses it below AVX-512 only (MEDSEG_CONV_DIRECT=0 keeps
// oneDNN everywhere).
bool conv3d_stride2_backward_data_direct(const ConvGeometry& g, const float* dy, const float* w,
                                         float* dx);

// Which implementation conv3d_forward / _leaky / conv3d_backward_data / conv3d_backward_weights
// run: our kernels above wherever they cover the geometry (Fixed; on AVX-512 the stride-2 direct
// kernels yield to oneDNN, which was measured faster there), or, per (geometry, pass), the faster
// of ours and oneDNN timed on the first call (Measure; results then depend on timing and need not
// repeat bit for bit). Auto (the default) is Fixed on every ISA. Setting a mode forgets the
// measured choices. conv_choices_measured: how many choices
// have been measured, and (any_ours) whether any of them took our kernel.
enum class ConvChoiceMode { Auto, Fixed, Measure };
void set_conv_choice_mode(ConvChoiceMode mode);
int64_t conv_choices_measured(bool* any_ours = nullptr);

// Drops every cached oneDNN primitive (tests; thread-count changes).
void clear_conv_cache();
// "avx512_core" etc.: the ISA oneDNN dispatches to on this CPU, and its version string.
const char* onednn_isa();
const char* onednn_version();

}  // namespace medseg::cpu
