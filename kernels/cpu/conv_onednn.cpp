// Fast 3-D convolutions through oneDNN 2.6 (v2 API: op descriptors), same contract as the
// references in conv_ref.cpp.
//
// Why it looks like this:
//  - Activations stay in our channels-last layout (format_tag::ndhwc); oneDNN's JIT kernels read
//    and write it directly, so no activation is ever reordered or copied.
//  - Weights are small (at most Cout*27*Cin floats), so oneDNN picks its preferred blocked weight
//    format (format_tag::any) and we reorder our KRSC weights into it (forward, backward-data) or
//    out of it (backward-weights). When the chosen format is already ours, the reorder is skipped.
//  - Building a primitive descriptor and JIT-compiling a primitive costs milliseconds, a U-Net step
//    calls ~40 convolutions, so primitives, reordered-weight buffers and scratchpads are cached per
//    (geometry, pass, bias, thread count). The thread count is part of the key because oneDNN
//    splits the work for the OpenMP thread count it sees at creation and expects the same count at
//    execution.
//  - Scratchpads are owned by the cache entries (scratchpad_mode::user) and arguments are passed
//    through the C API from cached arrays, so a call allocates nothing: it sets data handles and
//    executes.
//  - oneDNN 2.6 has no JIT backward-weights kernel for AVX2 when the DEPTH axis is padded (it falls
//    back to im2col + GEMM, ~8x slower on the 64^3 U-Net shapes; padding in H and W is fine). When
//    that happens and the unpadded-depth problem does get a JIT kernel, backward-weights runs on a
//    copy of x with explicit zero planes in depth (one contiguous memcpy per sample into a
//    per-thread workspace, ~5% of the pass). On ISAs whose JIT kernels handle depth padding nothing
//    is copied.
//  - Likewise the transposed conv's forward (a stride-2 backward-data for oneDNN) has no AVX2 JIT
//    kernel on ndhwc and falls back to GEMM with col2im. Since k = stride = 2 taps never overlap,
//    it is one GEMM, (N*D*H*W x Cin) * (Cin x 8*Cout), whose right factor is exactly our (Cin, 2,
//    2, 2, Cout) weight, followed by a scatter of the 8 taps into the 2x2x2 output blocks (with the
//    bias). This runs through dnnl_sgemm into the per-thread workspace, only where oneDNN has no
//    JIT kernel. The transposed conv's backward-weights is the same GEMM turned around, dw = x^T *
//    gather(dy), with gather(dy) the (N*D*H*W x 8*Cout) matrix of each input voxel's 2x2x2 output
//    block. On AVX2 oneDNN's JIT kernel for it reached ~40% of the GEMM's rate on the U-Net shape,
//    so below AVX-512 the GEMM is used; on AVX-512 oneDNN's kernel is kept (our direct kernel,
//    conv_transposed.cpp, is faster than both and normally runs; this is the oneDNN side).
//  - One engine and one stream for the process. A CPU stream with the OpenMP runtime executes in
//    the calling thread; each cache entry has its own mutex because its memory objects carry the
//    caller's pointers during a call.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <dnnl.hpp>

#include "kernels/cpu/conv_internal.hpp"
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/error.hpp"
#include "core/threads.hpp"
#include "kernels/cpu/conv.hpp"

namespace medseg::cpu {

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

dnnl::stream& stream() {
  static dnnl::stream s(engine());
  return s;
}

enum class Pass : int { Forward = 0, BackwardData = 1, BackwardWeights = 2 };

const char* pass_name(Pass p) {
  switch (p) {
    case Pass::Forward:
      return "forward";
    case Pass::BackwardData:
      return "backward-data";
    case Pass::BackwardWeights:
      return "backward-weights";
  }
  return "?";
}

struct Key {
  ConvGeometry g;
  Pass pass = Pass::Forward;
  bool bias = false;
  int threads = 1;
  bool leaky = false;       // forward only: LeakyReLU post-op
  float leaky_slope = 0.f;
  bool operator==(const Key& o) const = default;
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields
    auto mix = [&h](int64_t v) {
      h ^= static_cast<uint64_t>(v);
      h *= 1099511628211ull;
    };
    const ConvGeometry& g = k.g;
    for (int64_t v : {g.n, g.id, g.ih, g.iw, g.cin, g.od, g.oh, g.ow, g.cout}) mix(v);
    mix(g.k);
    mix(g.stride);
    mix(g.pad);
    mix(g.transposed);
    mix(static_cast<int>(k.pass));
    mix(k.bias);
    mix(k.threads);
    mix(k.leaky);
    uint32_t slope_bits = 0;
    std::memcpy(&slope_bits, &k.leaky_slope, sizeof slope_bits);
    mix(slope_bits);
    return static_cast<size_t>(h);
  }
};

// A runnable primitive with the memory objects its arguments point to. "User" memories have no
// buffer of their own: each call points them at the caller's arrays.
struct Entry {
  std::mutex mu;
  dnnl::primitive prim;
  std::vector<dnnl_exec_arg_t> args;
  // Activations (caller's arrays): for forward src = x, dst = y; backward-data dst = dy, src = dx;
  // backward-weights src = x, dst = dy.
  memory src, dst;
  memory weights_user;  // caller's w or dw, KRSC
  memory weights_prim;  // the primitive's weight format (== weights_user when no reorder is needed)
  memory bias;          // caller's b or db
  memory scratch;
  bool forward_by_gemm = false;  // transposed forward through dnnl_sgemm (see the header comment)
  int64_t depth_pad = 0;  // backward-weights on a depth-padded copy of x (see the header comment)
  bool reorder_weights = false;
  dnnl::primitive weights_reorder;  // user -> prim (forward, backward-data), prim -> user (weights)
  std::vector<dnnl_exec_arg_t> reorder_args;
};

memory::desc activation_md(int64_t n, int64_t c, int64_t d, int64_t h, int64_t w) {
  return memory::desc({n, c, d, h, w}, dt::f32, tag::ndhwc);
}

// Our weights as oneDNN sees them: logical dims (O, I, D, H, W) with O the output channels of the
// (de)convolution. Conv: (Cout, k, k, k, Cin) in memory = odhwi. Transposed: (Cin, 2, 2, 2, Cout)
// in memory = idhwo.
memory::desc user_weights_md(const ConvGeometry& g) {
  return memory::desc({g.cout, g.cin, g.k, g.k, g.k}, dt::f32,
                      g.transposed ? tag::idhwo : tag::odhwi);
}

memory::desc any_weights_md(const ConvGeometry& g) {
  return memory::desc({g.cout, g.cin, g.k, g.k, g.k}, dt::f32, tag::any);
}

memory::desc bias_md(const ConvGeometry& g) {
  return memory::desc({g.cout}, dt::f32, tag::a);
}

memory unbound(const memory::desc& md) {
  return memory(md, engine(), DNNL_MEMORY_NONE);
}

struct Descs {
  memory::desc src, dst, weights_any, bias;
  memory::dims strides, pad_l, pad_r;
};

Descs descs(const ConvGeometry& g) {
  Descs d;
  d.src = activation_md(g.n, g.cin, g.id, g.ih, g.iw);
  d.dst = activation_md(g.n, g.cout, g.od, g.oh, g.ow);
  d.weights_any = any_weights_md(g);
  d.bias = bias_md(g);
  d.strides = {g.stride, g.stride, g.stride};
  d.pad_l = {g.pad, g.pad, g.pad};
  // oneDNN checks (i - k + pad_l + pad_r) / stride + 1 == o with integer division, which is our own
  // formula for pad_r = pad.
  d.pad_r = {g.pad, g.pad, g.pad};
  return d;
}

// Convolution and deconvolution share every descriptor signature; only the types and the algorithm
// differ.
struct ConvOps {
  using Fwd = dnnl::convolution_forward;
  using BwdData = dnnl::convolution_backward_data;
  using BwdWeights = dnnl::convolution_backward_weights;
  static constexpr dnnl::algorithm algo = dnnl::algorithm::convolution_direct;
};
struct DeconvOps {
  using Fwd = dnnl::deconvolution_forward;
  using BwdData = dnnl::deconvolution_backward_data;
  using BwdWeights = dnnl::deconvolution_backward_weights;
  static constexpr dnnl::algorithm algo = dnnl::algorithm::deconvolution_direct;
};

template <class Ops>
typename Ops::Fwd::primitive_desc forward_pd(const Descs& d, bool bias,
                                             const dnnl::primitive_attr& attr) {
  using Fwd = typename Ops::Fwd;
  auto desc = bias ? typename Fwd::desc(dnnl::prop_kind::forward_training, Ops::algo, d.src,
                                        d.weights_any, d.bias, d.dst, d.strides, d.pad_l, d.pad_r)
                   : typename Fwd::desc(dnnl::prop_kind::forward_training, Ops::algo, d.src,
                                        d.weights_any, d.dst, d.strides, d.pad_l, d.pad_r);
  return typename Fwd::primitive_desc(desc, attr, engine());
}

void push_arg(std::vector<dnnl_exec_arg_t>& args, int name, const memory& m) {
  args.push_back(dnnl_exec_arg_t{name, m.get()});
}

// Binds the weight memories of `e`: weights_prim in the primitive's format `prim_md`, and a reorder
// between it and the caller's KRSC array when the formats differ.
void bind_weights(Entry& e, const ConvGeometry& g, const memory::desc& prim_md, bool to_prim) {
  const memory::desc user_md = user_weights_md(g);
  e.weights_user = unbound(user_md);
  e.reorder_weights = prim_md != user_md;
  if (!e.reorder_weights) {
    e.weights_prim = e.weights_user;
    return;
  }
  e.weights_prim = memory(prim_md, engine());  // owned buffer, reused by every call
  const memory& from = to_prim ? e.weights_user : e.weights_prim;
  const memory& to = to_prim ? e.weights_prim : e.weights_user;
  e.weights_reorder = dnnl::reorder(from, to);
  push_arg(e.reorder_args, DNNL_ARG_FROM, from);
  push_arg(e.reorder_args, DNNL_ARG_TO, to);
}

// Whether oneDNN picked one of its direct JIT kernels ("jit:avx2", "brg:avx512_core", ...) rather
// than im2col + GEMM ("x64:gemm:jit") or the reference ("ref:any").
bool is_jit(const dnnl::primitive_desc_base& pd) {
  const std::string impl = pd.impl_info_str();
  return (impl.rfind("jit:", 0) == 0 || impl.rfind("brg", 0) == 0);
}

template <class Ops>
std::shared_ptr<Entry> build(const Key& key) {
  const ConvGeometry& g = key.g;
  Descs d = descs(g);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto e = std::make_shared<Entry>();
  memory::desc scratch_md;

  if (key.pass == Pass::Forward) {
    if (key.leaky) {
      // eltwise_relu with alpha = the negative slope is LeakyReLU.
      dnnl::post_ops po;
      po.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, key.leaky_slope, 0.f);
      attr.set_post_ops(po);
    }
    auto pd = forward_pd<Ops>(d, key.bias, attr);
    if (g.transposed && !is_jit(pd)) {
      e->forward_by_gemm = true;
      return e;
    }
    e->prim = typename Ops::Fwd(pd);
    e->src = unbound(pd.src_desc());
    e->dst = unbound(pd.dst_desc());
    bind_weights(*e, g, pd.weights_desc(), /*to_prim=*/true);
    if (key.bias) e->bias = unbound(pd.bias_desc());
    scratch_md = pd.scratchpad_desc();
    push_arg(e->args, DNNL_ARG_SRC, e->src);
    push_arg(e->args, DNNL_ARG_WEIGHTS, e->weights_prim);
    if (key.bias) push_arg(e->args, DNNL_ARG_BIAS, e->bias);
    push_arg(e->args, DNNL_ARG_DST, e->dst);
  } else if (key.pass == Pass::BackwardData) {
    // The hint is only used to pick a compatible implementation; it is not kept.
    auto hint = forward_pd<Ops>(d, false, dnnl::primitive_attr());
    typename Ops::BwdData::desc desc(Ops::algo, d.src, d.weights_any, d.dst, d.strides, d.pad_l,
                                     d.pad_r);
    typename Ops::BwdData::primitive_desc pd(desc, attr, engine(), hint);
    e->prim = typename Ops::BwdData(pd);
    e->src = unbound(pd.diff_src_desc());
    e->dst = unbound(pd.diff_dst_desc());
    bind_weights(*e, g, pd.weights_desc(), /*to_prim=*/true);
    scratch_md = pd.scratchpad_desc();
    push_arg(e->args, DNNL_ARG_DIFF_DST, e->dst);
    push_arg(e->args, DNNL_ARG_WEIGHTS, e->weights_prim);
    push_arg(e->args, DNNL_ARG_DIFF_SRC, e->src);
  } else {
    using BwdW = typename Ops::BwdWeights;
    auto make_pd = [&](const Descs& dd) {
      auto hint = forward_pd<Ops>(dd, key.bias, dnnl::primitive_attr());
      auto desc = key.bias ? typename BwdW::desc(Ops::algo, dd.src, dd.weights_any, dd.bias, dd.dst,
                                                 dd.strides, dd.pad_l, dd.pad_r)
                           : typename BwdW::desc(Ops::algo, dd.src, dd.weights_any, dd.dst,
                                                 dd.strides, dd.pad_l, dd.pad_r);
      return typename BwdW::primitive_desc(desc, attr, engine(), hint);
    };
    auto pd = make_pd(d);
    if (!g.transposed && g.pad > 0 && !is_jit(pd)) {
      Descs padded = d;
      padded.src = activation_md(g.n, g.cin, g.id + 2 * g.pad, g.ih, g.iw);
      padded.pad_l[0] = padded.pad_r[0] = 0;
      auto alt = make_pd(padded);
      if (is_jit(alt)) {
        pd = alt;
        d = padded;
        e->depth_pad = g.pad;
      }
    }
    e->prim = BwdW(pd);
    e->src = unbound(pd.src_desc());
    e->dst = unbound(pd.diff_dst_desc());
    bind_weights(*e, g, pd.diff_weights_desc(), /*to_prim=*/false);
    if (key.bias) e->bias = unbound(pd.diff_bias_desc());
    scratch_md = pd.scratchpad_desc();
    push_arg(e->args, DNNL_ARG_SRC, e->src);
    push_arg(e->args, DNNL_ARG_DIFF_DST, e->dst);
    push_arg(e->args, DNNL_ARG_DIFF_WEIGHTS, e->weights_prim);
    if (key.bias) push_arg(e->args, DNNL_ARG_DIFF_BIAS, e->bias);
  }
  // The activation descriptors must be exactly ours: a primitive that wanted another activation
  // layout would silently read our arrays wrongly.
  MEDSEG_CHECK_T(Error, e->src.get_desc() == d.src && e->dst.get_desc() == d.dst,
                 "oneDNN chose a non-channels-last activation layout for ", g.str());
  e->scratch = memory(scratch_md, engine());
  push_arg(e->args, DNNL_ARG_SCRATCHPAD, e->scratch);
  return e;
}

// Geometries of one training run and its sliding-window inference number in the tens; the cap only
// guards a caller that streams ever-new shapes through the cache.
constexpr size_t kMaxCacheEntries = 512;

struct Cache {
  std::mutex mu;
  std::unordered_map<Key, std::shared_ptr<Entry>, KeyHash> map;
};

Cache& cache() {
  static Cache c;
  return c;
}

std::shared_ptr<Entry> lookup(const ConvGeometry& g, Pass pass, bool bias, bool leaky = false,
                              float slope = 0.f) {
  const Key key{g, pass, bias, num_threads(), leaky, slope};
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.map.find(key);
  if (it != c.map.end()) return it->second;
  std::shared_ptr<Entry> e;
  try {
    e = g.transposed ? build<DeconvOps>(key) : build<ConvOps>(key);
  } catch (const dnnl::error& err) {
    throw Error(std::string("oneDNN could not create the ") + pass_name(pass) + " primitive for " +
                g.str() + ": " + err.what());
  }
  if (c.map.size() >= kMaxCacheEntries) c.map.clear();  // entries in use stay alive (shared_ptr)
  c.map.emplace(key, e);
  return e;
}

void execute(const ConvGeometry& g, const dnnl::primitive& prim,
             const std::vector<dnnl_exec_arg_t>& args, const char* what) {
  const dnnl_status_t st = dnnl_primitive_execute(prim.get(), stream().get(),
                                                  static_cast<int>(args.size()), args.data());
  if (st != dnnl_success)
    throw Error(std::string("oneDNN ") + what + " failed for " + g.str() + " (status " +
                std::to_string(static_cast<int>(st)) + ")");
}

void set(const memory& m, const float* p) {
  m.set_data_handle(const_cast<float*>(p));
}

// Per-thread buffer for the depth-padded copy of x and the transposed conv's GEMM result (never
// both in one call). It grows to the largest geometry a thread meets and is then reused, so
// steady-state training steps allocate nothing.
float* thread_workspace(size_t floats) {
  thread_local detail::GrowingBuffer<float> ws;
  return ws.get(floats);
}

// x (N, D, H, W, C) -> out (N, p + D + p, H, W, C) with zero planes in front and behind every
// sample.
float* copy_depth_padded(const ConvGeometry& g, int64_t p, const float* x) {
  const int64_t plane = g.ih * g.iw * g.cin;
  const int64_t padded_depth = g.id + 2 * p;
  float* out = thread_workspace(static_cast<size_t>(g.n * padded_depth * plane));
  const int64_t planes = g.n * padded_depth;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < planes; ++i) {
    const int64_t n = i / padded_depth, d = i % padded_depth - p;
    float* dst = out + i * plane;
    if (d < 0 || d >= g.id)
      std::memset(dst, 0, static_cast<size_t>(plane) * sizeof(float));
    else
      std::memcpy(dst, x + (n * g.id + d) * plane, static_cast<size_t>(plane) * sizeof(float));
  }
  return out;
}

// y = scatter(x * w) + b for the k = stride = 2 transposed conv; see the header comment.
void transposed_forward_by_gemm(const ConvGeometry& g, const float* x, const float* w,
                                const float* b, float* y) {
  const int64_t rows = g.n * g.id * g.ih * g.iw, cols = 8 * g.cout, cout = g.cout;
  float* z = thread_workspace(static_cast<size_t>(rows * cols));
  const dnnl_status_t st =
      dnnl_sgemm('N', 'N', rows, cols, g.cin, 1.f, x, g.cin, w, cols, 0.f, z, cols);
  if (st != dnnl_success)
    throw Error("dnnl_sgemm failed for " + g.str() + " (status " +
                std::to_string(static_cast<int>(st)) + ")");
  const int64_t out_rows = g.n * g.od * g.oh;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < out_rows; ++r) {
    const int64_t n = r / (g.od * g.oh), od = (r / g.oh) % g.od, oh = r % g.oh;
    const float* zrow = z + ((n * g.id + od / 2) * g.ih + oh / 2) * g.iw * cols;
    const int64_t tap_dh = ((od % 2) * 2 + oh % 2) * 2;
    float* yrow = y + r * g.ow * cout;
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      const float* src = zrow + (ow / 2) * cols + (tap_dh + ow % 2) * cout;
      float* dst = yrow + ow * cout;
      if (b)
        for (int64_t co = 0; co < cout; ++co) dst[co] = src[co] + b[co];
      else
        std::memcpy(dst, src, static_cast<size_t>(cout) * sizeof(float));
    }
  }
}

// dw = x^T * gather(dy), db = column sums of dy, for the k = stride = 2 transposed conv.
void transposed_backward_weights_by_gemm(const ConvGeometry& g, const float* dy, const float* x,
                                         float* dw, float* db) {
  const int64_t rows = g.n * g.id * g.ih * g.iw, cols = 8 * g.cout, cout = g.cout;
  float* z = thread_workspace(static_cast<size_t>(rows * cols));
  const int64_t out_rows = g.n * g.od * g.oh;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < out_rows; ++r) {
    const int64_t n = r / (g.od * g.oh), od = (r / g.oh) % g.od, oh = r % g.oh;
    float* zrow = z + ((n * g.id + od / 2) * g.ih + oh / 2) * g.iw * cols;
    const int64_t tap_dh = ((od % 2) * 2 + oh % 2) * 2;
    const float* dyrow = dy + r * g.ow * cout;
    for (int64_t ow = 0; ow < g.ow; ++ow)
      std::memcpy(zrow + (ow / 2) * cols + (tap_dh + ow % 2) * cout, dyrow + ow * cout,
                  static_cast<size_t>(cout) * sizeof(float));
  }
  const dnnl_status_t st =
      dnnl_sgemm('T', 'N', g.cin, cols, rows, 1.f, x, g.cin, z, cols, 0.f, dw, cols);
  if (st != dnnl_success)
    throw Error("dnnl_sgemm failed for " + g.str() + " (status " +
                std::to_string(static_cast<int>(st)) + ")");
  if (db) detail::bias_gradient(dy, g.n * g.od * g.oh * g.ow, cout, db);
}

// Environment switch for A/B benchmarks: false when `name` is set to "0".
bool enabled_unless_zero(const char* name) {
  const char* e = std::getenv(name);
  return !(e && std::string(e) == "0");
}

bool below_avx512() {
  static const bool below = static_cast<int>(dnnl::get_effective_cpu_isa()) <
                                static_cast<int>(dnnl::cpu_isa::avx512_core) ||
                            dnnl::get_effective_cpu_isa() == dnnl::cpu_isa::avx2_vnni;
  return below;
}

// Our kernels (Winograd, direct) against oneDNN: ours run wherever they cover the geometry, on every
// ISA. Measured in development, 2 threads: on AVX2 (Zen 3) 1.4-6x oneDNN's kernels on the U-Net's
// shapes; on AVX-512 (Zen 4, oneDNN avx512_core_bf16, session 7) the Winograd passes 1.4-3.3x on
// volumes from 16^3 up and the transposed conv's forward and backward-weights 3.9x / 1.9x oneDNN
// called directly, but at 8^3 Winograd only ties in forward / backward-data and loses
// backward-weights (0.2-0.7x), and the direct backward-weights (0.67-0.99x at 8^3, 0.78-0.82x
// stride 2) and stride-2 backward-data (0.65-0.81x) kernels lose: those go to oneDNN there
// (docs/benchmarks.md). A fixed rule, not a timing: runs
// repeat bit for bit (resume is exact), which the measured mode (ConvChoiceMode::Measure, the
// first call of a geometry times both) cannot promise. MEDSEG_CONV_WINOGRAD=0 /
// MEDSEG_CONV_DIRECT=0 switch our kernels off (A/B runs).
bool use_direct() {
  static const bool on = enabled_unless_zero("MEDSEG_CONV_DIRECT");
  return on;
}

bool use_winograd() {
  static const bool on = enabled_unless_zero("MEDSEG_CONV_WINOGRAD");
  return on;
}

ConvChoiceMode& choice_mode_setting() {
  static ConvChoiceMode m = ConvChoiceMode::Auto;
  return m;
}

bool measure_choices() { return choice_mode_setting() == ConvChoiceMode::Measure; }

// On AVX-512 (see above): Winograd wins from 16^3 up; below that (the deep levels) oneDNN's
// kernels match it in the forward and backward-data and beat it 1.5-5x in backward-weights. The
// direct backward-weights kernels (any stride) and the stride-2 backward-data kernel lose there.
bool winograd_wins(const ConvGeometry& g) {
  return below_avx512() || std::min({g.id, g.ih, g.iw}) >= 16;
}
bool strided_direct_wins(const ConvGeometry& g) { return g.stride == 1 || below_avx512(); }
bool direct_weights_wins() { return below_avx512(); }

struct Choices {
  std::mutex mu;
  std::unordered_map<std::string, bool> ours;  // "geometry|pass|variant" -> ours was faster
};

Choices& choices() {
  static Choices c;
  return c;
}

// Runs `ours` (returns false, touching nothing, where our kernels do not cover the geometry) or
// `onednn`, as described above. `variant` names what else changes the work (bias, LeakyReLU).
template <class Ours, class OneDnn>
void dispatch(const ConvGeometry& g, Pass pass, const std::string& variant, Ours&& ours,
              OneDnn&& onednn) {
  if (!measure_choices()) {
    if (!ours()) onednn();
    return;
  }
  const std::string key = g.str() + "|" + pass_name(pass) + "|" + variant + "|" +
                          std::to_string(num_threads());
  Choices& c = choices();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    const auto it = c.ours.find(key);
    if (it != c.ours.end()) {
      if (!(it->second && ours())) onednn();
      return;
    }
  }
  // oneDNN first (warm-up: primitive creation and JIT; then timed), ours last (warm-up: scratch
  // buffers; then timed), and oneDNN once more when it won: the output of this first call comes
  // from the implementation every later call uses (a test caught the first call's oneDNN bits
  // differing from the later calls' own-kernel bits on an AVX-512 machine).
  const auto seconds = [](auto&& fn) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  onednn();
  const double t_onednn = seconds(onednn);
  bool faster = false;
  if (ours()) {
    const auto t0 = std::chrono::steady_clock::now();
    ours();
    faster = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < t_onednn;
    if (!faster) onednn();
  }
  std::lock_guard<std::mutex> lock(c.mu);
  c.ours.emplace(key, faster);
}

}  // namespace

namespace {
// The forward of conv3d_forward and conv3d_forward_leaky (slope: the LeakyReLU post-op, or none).
void forward(const ConvGeometry& g, const float* x, const float* w, const float* b, float* y,
             std::optional<float> slope) {
  validate(g);
  MEDSEG_CHECK(x && w && y, "conv3d_forward: null x, w or y for ", g.str());
  MEDSEG_CHECK(!slope || !g.transposed, "conv3d_forward_leaky: not for transposed convolutions (",
               g.str(), ")");
  const auto ours = [&] {
    return (use_winograd() && winograd_wins(g) && conv3d_forward_winograd(g, x, w, b, y, slope)) ||
           (use_direct() && conv_transpose2_forward_direct(g, x, w, b, y));
  };
  const auto onednn = [&] {
    auto e = lookup(g, Pass::Forward, b != nullptr, slope.has_value(), slope.value_or(0.f));
    if (e->forward_by_gemm) return transposed_forward_by_gemm(g, x, w, b, y);
    std::lock_guard<std::mutex> lock(e->mu);
    set(e->src, x);
    set(e->dst, y);
    set(e->weights_user, w);
    if (b) set(e->bias, b);
    if (e->reorder_weights) execute(g, e->weights_reorder, e->reorder_args, "weight reorder");
    execute(g, e->prim, e->args, slope ? "forward convolution + LeakyReLU" : "forward convolution");
    stream().wait();
  };
  dispatch(g, Pass::Forward,
           std::string(b ? "bias" : "") + (slope ? "leaky" + std::to_string(*slope) : ""), ours,
           onednn);
}
}  // namespace

void conv3d_forward(const ConvGeometry& g, const float* x, const float* w, const float* b,
                    float* y) {
  forward(g, x, w, b, y, std::nullopt);
}

void conv3d_forward_leaky(const ConvGeometry& g, const float* x, const float* w, const float* b,
                          float* y, float slope) {
  forward(g, x, w, b, y, slope);
}

void conv3d_backward_data(const ConvGeometry& g, const float* dy, const float* w, float* dx) {
  validate(g);
  MEDSEG_CHECK(dy && w && dx, "conv3d_backward_data: null dy, w or dx for ", g.str());
  const auto ours = [&] {
    return (use_winograd() && winograd_wins(g) && conv3d_backward_data_winograd(g, dy, w, dx)) ||
           (use_direct() && strided_direct_wins(g) &&
            conv3d_stride2_backward_data_direct(g, dy, w, dx));
  };
  const auto onednn = [&] {
    auto e = lookup(g, Pass::BackwardData, false);
    std::lock_guard<std::mutex> lock(e->mu);
    set(e->dst, dy);
    set(e->src, dx);
    set(e->weights_user, w);
    if (e->reorder_weights) execute(g, e->weights_reorder, e->reorder_args, "weight reorder");
    execute(g, e->prim, e->args, "backward-data convolution");
    stream().wait();
  };
  dispatch(g, Pass::BackwardData, "", ours, onednn);
}

void conv3d_backward_weights(const ConvGeometry& g, const float* dy, const float* x, float* dw,
                             float* db) {
  validate(g);
  MEDSEG_CHECK(dy && x && dw, "conv3d_backward_weights: null dy, x or dw for ", g.str());
  // Below AVX-512 oneDNN's channels-last backward-weights runs at half its forward rate; the direct
  // register-tiled kernels cover the U-Net's channel counts (conv_direct.cpp, conv_transposed.cpp).
  const auto ours = [&] {
    if (g.transposed) return use_direct() && conv_transpose2_backward_weights_direct(g, dy, x, dw, db);
    return (use_winograd() && winograd_wins(g) &&
            conv3d_backward_weights_winograd(g, dy, x, dw, db)) ||
           (use_direct() && direct_weights_wins() &&
            conv3d_backward_weights_direct(g, dy, x, dw, db));
  };
  const auto onednn = [&] {
    if (g.transposed && below_avx512()) return transposed_backward_weights_by_gemm(g, dy, x, dw, db);
    auto e = lookup(g, Pass::BackwardWeights, db != nullptr);
    std::lock_guard<std::mutex> lock(e->mu);
    set(e->src, e->depth_pad > 0 ? copy_depth_padded(g, e->depth_pad, x) : x);
    set(e->dst, dy);
    set(e->weights_user, dw);
    if (db) set(e->bias, db);
    execute(g, e->prim, e->args, "backward-weights convolution");
    if (e->reorder_weights) execute(g, e->weights_reorder, e->reorder_args, "weight reorder");
    stream().wait();
  };
  dispatch(g, Pass::BackwardWeights, db ? "bias" : "", ours, onednn);
}

void set_conv_choice_mode(ConvChoiceMode mode) {
  choice_mode_setting() = mode;
  Choices& c = choices();
  std::lock_guard<std::mutex> lock(c.mu);
  c.ours.clear();
}

int64_t conv_choices_measured(bool* any_ours) {
  Choices& c = choices();
  std::lock_guard<std::mutex> lock(c.mu);
  if (any_ours) {
    *any_ours = false;
    for (const auto& kv : c.ours) *any_ours = *any_ours || kv.second;
  }
  return static_cast<int64_t>(c.ours.size());
}

namespace detail {
void bias_gradient(const float* dy, int64_t voxels, int64_t cout, float* db) {
  // Per-channel sums, accumulated in double per thread.
  thread_local std::vector<double> acc_storage;
  acc_storage.assign(static_cast<size_t>(cout), 0.0);
  double* acc = acc_storage.data();
#pragma omp parallel for schedule(static) reduction(+ : acc[:cout])
  for (int64_t v = 0; v < voxels; ++v)
    for (int64_t co = 0; co < cout; ++co) acc[co] += dy[v * cout + co];
  for (int64_t co = 0; co < cout; ++co) db[co] = static_cast<float>(acc[co]);
}
}  // namespace detail

void clear_conv_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.map.clear();
}

const char* onednn_isa() {
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::all:
      return "all";
    case dnnl::cpu_isa::sse41:
      return "sse41";
    case dnnl::cpu_isa::avx:
      return "avx";
    case dnnl::cpu_isa::avx2:
      return "avx2";
    case dnnl::cpu_isa::avx512_mic:
      return "avx512_mic";
    case dnnl::cpu_isa::avx512_mic_4ops:
      return "avx512_mic_4ops";
    case dnnl::cpu_isa::avx512_core:
      return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_amx:
      return "avx512_core_amx";
    case dnnl::cpu_isa::avx2_vnni:
      return "avx2_vnni";
  }
  return "unknown";
}

const char* onednn_version() {
  static const std::string text = [] {
    const dnnl_version_t* v = dnnl_version();
    std::string s =
        std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
    if (v->hash && std::strcmp(v->hash, "N/A") != 0) s += " (" + std::string(v->hash) + ")";
    return s;
  }();
  return text.c_str();
}

}  // namespace medseg::cpu
