// cuDNN 3-D convolutions (contract: conv.hpp). Host code: descriptors, algorithm search, calls.
//
// Every pass is one of cuDNN's three operations on one "cuDNN conv" from tensor A to tensor B with
// filter W (A -> B is a regular forward convolution):
//   regular conv:     A = x, B = y;          fwd = FWD(A->B), bwd data = BWD_DATA(dB->dA),
//                                             bwd weights = BWD_FILTER(A, dB)
//   transposed conv:  A = y-shaped (big, Cout channels), B = x-shaped (small, Cin channels), W the
//                     (Cin, 2, 2, 2, Cout) weight as a K = Cin, C = Cout filter, stride 2, pad 0;
//                     fwd = BWD_DATA(x as dB -> y as dA), bwd data = FWD(dy as A -> dx as B),
//                     bwd weights = BWD_FILTER(dy as A, x as dB).
// The bias is added by our own kernel after the convolution, and its gradient is our deterministic
// channel sum of dy (ops.cu): cudnnConvolutionBackwardBias would do the same work with one more
// descriptor and atomics in some versions.
//
// The legacy convolution API used here is marked deprecated in cuDNN 9 but fully supported there;
// the deprecation attributes are only active with CUDNN_WARN_DEPRECATED, which we do not define.
#include <algorithm>
#include <climits>
#include <memory>
#include <optional>
#include <sstream>
#include <vector>

#include "core/error.hpp"
#include "kernels/cuda/conv.hpp"
#include "kernels/cuda/ops.hpp"

namespace medseg::cuda {
namespace {

enum class Op { Fwd = 0, BwdData = 1, BwdFilter = 2 };

struct Choice {
  bool ready = false;
  int algo = 0;  // cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t
  size_t workspace = 0;
  cudnnMathType_t math = CUDNN_FMA_MATH;
};

// Descriptors of one (geometry, TF32) pair, and the chosen algorithm of each cuDNN operation.
struct ConvPlan {
  ConvGeometry g;
  bool tf32 = false;
  cudnnTensorDescriptor_t a = nullptr, b = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;
  Choice choice[3];

  ConvPlan() = default;
  ConvPlan(const ConvPlan&) = delete;
  ConvPlan& operator=(const ConvPlan&) = delete;
  ~ConvPlan() {  // never throws; errors at teardown cannot be acted on
    if (a) cudnnDestroyTensorDescriptor(a);
    if (b) cudnnDestroyTensorDescriptor(b);
    if (w) cudnnDestroyFilterDescriptor(w);
    if (conv) cudnnDestroyConvolutionDescriptor(conv);
  }
};

struct ConvPlanCache {
  std::vector<std::unique_ptr<ConvPlan>> plans;
};

ConvPlanCache& plan_cache(CudaContext& ctx) {
  auto& slot = ctx.conv_plan_slot();
  if (!slot) slot = std::make_shared<ConvPlanCache>();
  return *static_cast<ConvPlanCache*>(slot.get());
}

int to_int(int64_t v, const ConvGeometry& g) {
  MEDSEG_CHECK(v >= 0 && v <= INT_MAX, "dimension ", v, " of ", g.str(),
               " exceeds cuDNN's int range");
  return static_cast<int>(v);
}

// A channels-last 5-D tensor (N, D, H, W, C) as a cuDNN NDHWC descriptor (dims in N, C, D, H, W
// order).
void set_tensor(cudnnTensorDescriptor_t d, int64_t n, int64_t c, int64_t dd, int64_t h, int64_t w,
                const ConvGeometry& g) {
  MEDSEG_CHECK(n * c * dd * h * w <= INT_MAX, "tensor of ", n * c * dd * h * w, " elements in ",
               g.str(), " exceeds cuDNN's 2^31 element limit");
  const int dims[5] = {to_int(n, g), to_int(c, g), to_int(dd, g), to_int(h, g), to_int(w, g)};
  MEDSEG_CUDNN_CHECK(cudnnSetTensorNdDescriptorEx(d, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, 5, dims));
}

std::unique_ptr<ConvPlan> make_plan(const ConvGeometry& g, bool tf32) {
  auto p = std::make_unique<ConvPlan>();
  p->g = g;
  p->tf32 = tf32;
  MEDSEG_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->a));
  MEDSEG_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->b));
  MEDSEG_CUDNN_CHECK(cudnnCreateFilterDescriptor(&p->w));
  MEDSEG_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&p->conv));
  int k = g.k, stride = g.stride, pad = g.pad;
  int filter_k = 0, filter_c = 0;
  if (!g.transposed) {
    set_tensor(p->a, g.n, g.cin, g.id, g.ih, g.iw, g);
    set_tensor(p->b, g.n, g.cout, g.od, g.oh, g.ow, g);
    filter_k = to_int(g.cout, g);
    filter_c = to_int(g.cin, g);
  } else {
    set_tensor(p->a, g.n, g.cout, g.od, g.oh, g.ow, g);
    set_tensor(p->b, g.n, g.cin, g.id, g.ih, g.iw, g);
    filter_k = to_int(g.cin, g);
    filter_c = to_int(g.cout, g);
    k = 2, stride = 2, pad = 0;
  }
  // CUDNN_TENSOR_NHWC filter format: memory order K, T, R, S, C (our (Cout, k, k, k, Cin)); dims
  // are still given as K, C, T, R, S.
  const int fdims[5] = {filter_k, filter_c, k, k, k};
  MEDSEG_CUDNN_CHECK(
      cudnnSetFilterNdDescriptor(p->w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NHWC, 5, fdims));
  const int pads[3] = {pad, pad, pad}, strides[3] = {stride, stride, stride}, dil[3] = {1, 1, 1};
  MEDSEG_CUDNN_CHECK(cudnnSetConvolutionNdDescriptor(p->conv, 3, pads, strides, dil,
                                                     CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
  MEDSEG_CUDNN_CHECK(
      cudnnSetConvolutionMathType(p->conv, tf32 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH));

  // The descriptors must describe B as cuDNN's forward output of A; a mismatch here is our bug.
  int out[5] = {0};
  MEDSEG_CUDNN_CHECK(cudnnGetConvolutionNdForwardOutputDim(p->conv, p->a, p->w, 5, out));
  const int64_t want_c = g.transposed ? g.cin : g.cout;
  const int64_t want_d = g.transposed ? g.id : g.od, want_h = g.transposed ? g.ih : g.oh,
                want_w = g.transposed ? g.iw : g.ow;
  if (out[0] != g.n || out[1] != want_c || out[2] != want_d || out[3] != want_h ||
      out[4] != want_w) {
    std::ostringstream os;
    os << "cuDNN computes output (N,C,D,H,W) = (" << out[0] << "," << out[1] << "," << out[2] << ","
       << out[3] << "," << out[4] << ") for " << g.str() << ", expected (" << g.n << "," << want_c
       << "," << want_d << "," << want_h << "," << want_w << ")";
    throw CudaError(os.str());
  }
  return p;
}

ConvPlan& find_plan(CudaContext& ctx, const ConvGeometry& g) {
  auto& cache = plan_cache(ctx);
  const bool tf32 = ctx.allow_tf32();
  for (auto& p : cache.plans)
    if (p->g == g && p->tf32 == tf32) return *p;
  cache.plans.push_back(make_plan(g, tf32));
  return *cache.plans.back();
}

// The first result, in the given order, that may be used: successful, within `limit` workspace,
// deterministic first (some backward algorithms accumulate with atomics, and the timing-based
// choice could then change the bits from one run to the next; a non-deterministic one only when
// no deterministic one fits). With TF32 off only exact fp32 is acceptable: results reported with
// CUDNN_FMA_MATH first; failing those, CUDNN_DEFAULT_MATH ones, which are then run with the math
// type forced to FMA (DEFAULT permits TF32 on Ampere and later, so it is never left in place).
template <typename Perf>
bool first_usable(const Perf* results, int count, size_t limit, bool tf32, Choice* out) {
  for (int pass = 0; pass < 4; ++pass) {
    const bool deterministic_only = pass < 2;
    const cudnnMathType_t exact = pass % 2 == 0 ? CUDNN_FMA_MATH : CUDNN_DEFAULT_MATH;
    for (int i = 0; i < count; ++i) {
      const Perf& r = results[i];
      if (r.status != CUDNN_STATUS_SUCCESS || r.memory > limit) continue;
      if (deterministic_only && r.determinism != CUDNN_DETERMINISTIC) continue;
      if (!tf32 && r.mathType != exact) continue;
      out->ready = true;
      out->algo = static_cast<int>(r.algo);
      out->workspace = r.memory;
      out->math = tf32 ? r.mathType : CUDNN_FMA_MATH;
      return true;
    }
  }
  return false;
}

// Picks the fastest usable result of a search (cuDNN returns them fastest first).
template <typename Perf>
Choice pick(const Perf* results, int count, size_t limit, bool tf32, const char* what,
            const ConvGeometry& g) {
  Choice c;
  if (first_usable(results, count, limit, tf32, &c)) return c;
  std::ostringstream os;
  os << "cuDNN found no usable " << what << " algorithm for " << g.str()
     << " within a workspace of " << limit << " bytes (" << count << " candidates:";
  for (int i = 0; i < count; ++i)
    os << " [algo " << static_cast<int>(results[i].algo) << ": "
       << cudnnGetErrorString(results[i].status) << ", " << results[i].memory << " B, math "
       << static_cast<int>(results[i].mathType) << "]";
  os << ")";
  throw CudaError(os.str());
}

// The workspace of the first usable algorithm in cuDNN's heuristic order (cudnnGet*Algorithm_v7:
// nothing is run or allocated), or nullopt when the heuristics name none.
template <typename Perf, typename Query>
std::optional<size_t> heuristic_workspace(const CudaContext& ctx, bool tf32, int max_count,
                                          Query&& query) {
  std::vector<Perf> perf(std::max(max_count, 1));
  int returned = 0;
  if (query(static_cast<int>(perf.size()), &returned, perf.data()) != CUDNN_STATUS_SUCCESS)
    return std::nullopt;
  Choice c;
  if (!first_usable(perf.data(), returned, ctx.workspace_limit(), tf32, &c)) return std::nullopt;
  return c.workspace;
}

// Workspace for the search (cudnnFind*Ex times only the algorithms that fit in it). The search
// runs the first time a geometry is met, inside the first training step, while the activations
// are live; a search buffer of the whole limit (4 GiB) then became the step's peak memory (14.4 GB
// against PyTorch's 8.0 GB on an H200, session 6). So the budget is what cuDNN's heuristic choice
// needs, at least kSearchFloor (so that a heuristic pick without workspace does not shut out a
// faster algorithm with a modest one) and at least what the context already holds (free to use),
// capped by the limit and by half the free memory. Without a heuristic answer: the whole cap.
constexpr size_t kSearchFloor = size_t{256} << 20;

size_t search_workspace(CudaContext& ctx, std::optional<size_t> heuristic) {
  size_t free_b = 0, total_b = 0;
  MEDSEG_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const size_t cap = std::min(ctx.workspace_limit(), free_b / 2);
  const size_t want = heuristic ? std::min(std::max(*heuristic, kSearchFloor), cap) : cap;
  return std::max(want, ctx.workspace_bytes());
}

// The largest workspace a chosen algorithm may use: what the search had, but never more than the
// limit (the search buffer can exceed it when the context's workspace already did).
size_t choice_limit(const CudaContext& ctx, size_t search_bytes) {
  return std::min(search_bytes, ctx.workspace_limit());
}

// The chosen algorithm's math type is set on the descriptor before every call: cuDNN reports, and
// runs, each algorithm with a specific math type, and with TF32 allowed the search may return
// either.
void apply_math(ConvPlan& p, const Choice& c) {
  MEDSEG_CUDNN_CHECK(cudnnSetConvolutionMathType(p.conv, c.math));
}

// ---- the three cuDNN operations, each planned on first use ----
void run_fwd(CudaContext& ctx, ConvPlan& p, const float* a, const float* w, float* b) {
  Choice& c = p.choice[static_cast<int>(Op::Fwd)];
  if (!c.ready) {
    MEDSEG_CUDNN_CHECK(
        cudnnSetConvolutionMathType(p.conv, p.tf32 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH));
    int max_count = 0;
    MEDSEG_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithmMaxCount(ctx.cudnn(), &max_count));
    const auto hint = heuristic_workspace<cudnnConvolutionFwdAlgoPerf_t>(
        ctx, p.tf32, max_count, [&](int n, int* ret, cudnnConvolutionFwdAlgoPerf_t* out) {
          return cudnnGetConvolutionForwardAlgorithm_v7(ctx.cudnn(), p.a, p.w, p.conv, p.b, n, ret,
                                                        out);
        });
    std::vector<cudnnConvolutionFwdAlgoPerf_t> perf(std::max(max_count, 1));
    int returned = 0;
    const size_t ws = search_workspace(ctx, hint);
    void* wsp = ctx.workspace(ws);
    MEDSEG_CUDNN_CHECK(cudnnFindConvolutionForwardAlgorithmEx(ctx.cudnn(), p.a, a, p.w, w, p.conv,
                                                              p.b, b, static_cast<int>(perf.size()),
                                                              &returned, perf.data(), wsp, ws));
    c = pick(perf.data(), returned, choice_limit(ctx, ws), p.tf32, "forward", p.g);
    ctx.settle_workspace(c.workspace);
  }
  apply_math(p, c);
  void* wsp = ctx.workspace(c.workspace);
  const float one = 1.f, zero = 0.f;
  MEDSEG_CUDNN_CHECK(cudnnConvolutionForward(ctx.cudnn(), &one, p.a, a, p.w, w, p.conv,
                                             static_cast<cudnnConvolutionFwdAlgo_t>(c.algo), wsp,
                                             c.workspace, &zero, p.b, b));
}

void run_bwd_data(CudaContext& ctx, ConvPlan& p, const float* w, const float* db, float* da) {
  Choice& c = p.choice[static_cast<int>(Op::BwdData)];
  if (!c.ready) {
    MEDSEG_CUDNN_CHECK(
        cudnnSetConvolutionMathType(p.conv, p.tf32 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH));
    int max_count = 0;
    MEDSEG_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithmMaxCount(ctx.cudnn(), &max_count));
    const auto hint = heuristic_workspace<cudnnConvolutionBwdDataAlgoPerf_t>(
        ctx, p.tf32, max_count, [&](int n, int* ret, cudnnConvolutionBwdDataAlgoPerf_t* out) {
          return cudnnGetConvolutionBackwardDataAlgorithm_v7(ctx.cudnn(), p.w, p.b, p.conv, p.a, n,
                                                             ret, out);
        });
    std::vector<cudnnConvolutionBwdDataAlgoPerf_t> perf(std::max(max_count, 1));
    int returned = 0;
    const size_t ws = search_workspace(ctx, hint);
    void* wsp = ctx.workspace(ws);
    MEDSEG_CUDNN_CHECK(cudnnFindConvolutionBackwardDataAlgorithmEx(
        ctx.cudnn(), p.w, w, p.b, db, p.conv, p.a, da, static_cast<int>(perf.size()), &returned,
        perf.data(), wsp, ws));
    c = pick(perf.data(), returned, choice_limit(ctx, ws), p.tf32, "backward-data", p.g);
    ctx.settle_workspace(c.workspace);
  }
  apply_math(p, c);
  void* wsp = ctx.workspace(c.workspace);
  const float one = 1.f, zero = 0.f;
  MEDSEG_CUDNN_CHECK(cudnnConvolutionBackwardData(
      ctx.cudnn(), &one, p.w, w, p.b, db, p.conv,
      static_cast<cudnnConvolutionBwdDataAlgo_t>(c.algo), wsp, c.workspace, &zero, p.a, da));
}

void run_bwd_filter(CudaContext& ctx, ConvPlan& p, const float* a, const float* db, float* dw) {
  Choice& c = p.choice[static_cast<int>(Op::BwdFilter)];
  if (!c.ready) {
    MEDSEG_CUDNN_CHECK(
        cudnnSetConvolutionMathType(p.conv, p.tf32 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH));
    int max_count = 0;
    MEDSEG_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(ctx.cudnn(), &max_count));
    const auto hint = heuristic_workspace<cudnnConvolutionBwdFilterAlgoPerf_t>(
        ctx, p.tf32, max_count, [&](int n, int* ret, cudnnConvolutionBwdFilterAlgoPerf_t* out) {
          return cudnnGetConvolutionBackwardFilterAlgorithm_v7(ctx.cudnn(), p.a, p.b, p.conv, p.w, n,
                                                               ret, out);
        });
    std::vector<cudnnConvolutionBwdFilterAlgoPerf_t> perf(std::max(max_count, 1));
    int returned = 0;
    const size_t ws = search_workspace(ctx, hint);
    void* wsp = ctx.workspace(ws);
    MEDSEG_CUDNN_CHECK(cudnnFindConvolutionBackwardFilterAlgorithmEx(
        ctx.cudnn(), p.a, a, p.b, db, p.conv, p.w, dw, static_cast<int>(perf.size()), &returned,
        perf.data(), wsp, ws));
    c = pick(perf.data(), returned, choice_limit(ctx, ws), p.tf32, "backward-filter", p.g);
    ctx.settle_workspace(c.workspace);
  }
  apply_math(p, c);
  void* wsp = ctx.workspace(c.workspace);
  const float one = 1.f, zero = 0.f;
  MEDSEG_CUDNN_CHECK(cudnnConvolutionBackwardFilter(
      ctx.cudnn(), &one, p.a, a, p.b, db, p.conv,
      static_cast<cudnnConvolutionBwdFilterAlgo_t>(c.algo), wsp, c.workspace, &zero, p.w, dw));
}

void check_pointers(const void* a, const void* b, const void* c, const char* what) {
  MEDSEG_CHECK(a && b && c, "null device pointer passed to ", what);
}

}  // namespace

void conv3d_forward(CudaContext& ctx, const ConvGeometry& g, const float* x, const float* w,
                    const float* b, float* y) {
  cpu::validate(g);
  check_pointers(x, w, y, "cuda::conv3d_forward");
  ConvPlan& p = find_plan(ctx, g);
  if (!g.transposed)
    run_fwd(ctx, p, x, w, y);
  else
    run_bwd_data(ctx, p, w, x, y);
  if (b) add_channel_bias(ctx, g.n * g.od * g.oh * g.ow, g.cout, b, y);
}

void conv3d_backward_data(CudaContext& ctx, const ConvGeometry& g, const float* dy, const float* w,
                          float* dx) {
  cpu::validate(g);
  check_pointers(dy, w, dx, "cuda::conv3d_backward_data");
  ConvPlan& p = find_plan(ctx, g);
  if (!g.transposed)
    run_bwd_data(ctx, p, w, dy, dx);
  else
    run_fwd(ctx, p, dy, w, dx);
}

void conv3d_backward_weights(CudaContext& ctx, const ConvGeometry& g, const float* dy,
                             const float* x, float* dw, float* db) {
  cpu::validate(g);
  check_pointers(dy, x, dw, "cuda::conv3d_backward_weights");
  ConvPlan& p = find_plan(ctx, g);
  if (!g.transposed)
    run_bwd_filter(ctx, p, x, dy, dw);
  else
    run_bwd_filter(ctx, p, dy, x, dw);
  if (db) channel_sum(ctx, g.n * g.od * g.oh * g.ow, g.cout, dy, db);
}

std::string conv_plan_description(CudaContext& ctx, const ConvGeometry& g) {
  auto& cache = plan_cache(ctx);
  for (auto& p : cache.plans) {
    if (!(p->g == g) || p->tf32 != ctx.allow_tf32()) continue;
    // Name the passes of OUR op (for a transposed conv, fwd is cuDNN's backward-data and so on).
    const Op ours[3] = {g.transposed ? Op::BwdData : Op::Fwd, g.transposed ? Op::Fwd : Op::BwdData,
                        Op::BwdFilter};
    const char* names[3] = {"fwd", "bwd_data", "bwd_weights"};
    const char* cudnn_names[3] = {"FWD", "BWD_DATA", "BWD_FILTER"};
    std::ostringstream os;
    for (int i = 0; i < 3; ++i) {
      const int op = static_cast<int>(ours[i]);
      const Choice& c = p->choice[op];
      if (!c.ready) continue;
      if (os.tellp() > 0) os << "; ";
      os << names[i] << " " << cudnn_names[op] << " algo " << c.algo << " ws " << c.workspace
         << " B math "
         << (c.math == CUDNN_FMA_MATH         ? "fma"
             : c.math == CUDNN_TENSOR_OP_MATH ? "tensor_op"
                                              : "other");
    }
    return os.str();
  }
  return "";
}

void clear_conv_plans(CudaContext& ctx) {
  ctx.synchronize();
  ctx.conv_plan_slot().reset();
}

}  // namespace medseg::cuda
