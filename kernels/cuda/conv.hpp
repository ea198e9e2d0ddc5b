// 3-D convolutions on the GPU through cuDNN, with the contract of kernels/cpu/conv.hpp
// (ConvGeometry, layouts, ASSIGN semantics) on device pointers:
//   activations (N, D, H, W, C)      -> cuDNN 5-D tensors in CUDNN_TENSOR_NHWC (NDHWC) format
//   conv weight (Cout, k, k, k, Cin) -> cuDNN filter K = Cout, C = Cin in CUDNN_TENSOR_NHWC (KTRSC)
//   transposed weight (Cin, 2, 2, 2, Cout): the KTRSC filter (K = Cin, C = Cout) of the
//     stride-2 conv from the big (Cout) tensor to the small (Cin) one; the transposed conv's
//     forward is that conv's backward-data, its backward-data is that conv's forward, its weight
//     gradient that conv's filter gradient with the roles of input and output gradient swapped.
// Algorithms are chosen once per (geometry, pass, TF32 setting) by cudnnFind*AlgorithmEx (timed on
// the caller's buffers, within ctx.workspace_limit()) and cached with the descriptors in the
// context. Math: CUDNN_TENSOR_OP_MATH (TF32 tensor cores) only when ctx.allow_tf32(), else
// CUDNN_FMA_MATH (exact fp32 FMA, no tensor cores).
#pragma once

#include "kernels/cpu/conv.hpp"
#include "kernels/cuda/device.hpp"

namespace medseg::cuda {

using cpu::ConvGeometry;

// y = conv(x, w) + b (b may be null). y is assigned.
void conv3d_forward(CudaContext& ctx, const ConvGeometry& g, const float* x, const float* w,
                    const float* b, float* y);
// dx = d(loss)/dx given dy (assigned).
void conv3d_backward_data(CudaContext& ctx, const ConvGeometry& g, const float* dy, const float* w,
                          float* dx);
// dw (and db when not null) assigned.
void conv3d_backward_weights(CudaContext& ctx, const ConvGeometry& g, const float* dy,
                             const float* x, float* dw, float* db);

// The algorithm cached for each pass of a geometry under the context's current TF32 setting, for
// benchmark tables ("fwd IMPLICIT_PRECOMP_GEMM ws 0 B" ...); "" for passes not planned yet.
std::string conv_plan_description(CudaContext& ctx, const ConvGeometry& g);
// Drops the cached plans of the context (descriptors and algorithm choices).
void clear_conv_plans(CudaContext& ctx);

}  // namespace medseg::cuda
