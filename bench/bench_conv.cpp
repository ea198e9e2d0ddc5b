// bench_conv: GFLOP/s of the CPU convolutions (kernels/cpu/conv.hpp) on the reference U-Net shapes.
//
// It first validates the fast path against the double-accumulating reference on small odd shapes
// (and stops with exit code 1 if they disagree), then times forward, backward-data and
// backward-weights: one untimed warm-up call (primitive creation, first touch of the buffers), then
// the median of --reps timed calls. Each case is also timed through oneDNN called directly on the
// same channels-last buffers, with weights already in oneDNN's preferred format and no wrapper: the
// "ratio" column is medseg / direct, so the cost of our cache lookup, weight reorders and checks
// shows up as ratio < 1.
//
// bench_conv [--threads N (default 2)] [--reps N (default 7)] [--json] [--quick] [--case TEXT]
//            [--fixed | --measure]
// --json prints one JSON object per line on stdout instead of the table; --quick times only the
// 16->16 case; --case times only the cases whose name contains TEXT (e.g. "up", "s2"); --fixed /
// --measure set the dispatch mode (cpu::ConvChoiceMode; --fixed: our kernels wherever they cover
// the geometry, so "ratio" compares them with oneDNN).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dnnl.hpp>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "core/threads.hpp"
#include "kernels/cpu/conv.hpp"

using namespace medseg;
using namespace medseg::cpu;

namespace {

enum class Pass { Forward, BackwardData, BackwardWeights };
const char* pass_name(Pass p) {
  return p == Pass::Forward        ? "forward"
         : p == Pass::BackwardData ? "backward-data"
                                   : "backward-weights";
}

std::vector<float> random_values(int64_t count, Rng& rng) {
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = static_cast<float>(rng.uniform(-1.0, 1.0));
  return v;
}

// ---------------------------------------------------------------------------- validation

// Same bound and reasoning as tests/kernels_conv.cpp: fp32 sums of up to ~1000 terms in oneDNN's
// order err by a few u*sqrt(T) ~ 2e-6 of the output scale; 2e-5 of max|ref| leaves a 10x margin and
// is ~1000x below the error of a wrong tap or a lost term.
constexpr double kRelTol = 2e-5;

bool close_to_reference(const std::vector<float>& fast, const std::vector<float>& ref,
                        const std::string& what) {
  double max_ref = 0.0;
  for (float r : ref) max_ref = std::max(max_ref, std::fabs(static_cast<double>(r)));
  const double tol = kRelTol * max_ref;
  for (size_t i = 0; i < fast.size(); ++i) {
    const double err = std::fabs(static_cast<double>(fast[i]) - ref[i]);
    if (!(err <= tol)) {
      std::cerr << "bench_conv: VALIDATION FAILED " << what << ": index " << i << " fast "
                << fast[i] << " reference " << ref[i] << " |diff| " << err << " > " << tol << "\n";
      return false;
    }
  }
  return true;
}

bool validate_against_reference(const ConvGeometry& g, uint64_t seed) {
  Rng rng(seed);
  const auto x = random_values(g.in_shape().numel(), rng);
  const auto w = random_values(g.weight_shape().numel(), rng);
  const auto b = random_values(g.cout, rng);
  const auto dy = random_values(g.out_shape().numel(), rng);
  const float nan = std::nanf("");
  std::vector<float> y(dy.size(), nan), y_ref(dy.size());
  std::vector<float> dx(x.size(), nan), dx_ref(x.size());
  std::vector<float> dw(w.size(), nan), dw_ref(w.size()), db(b.size(), nan), db_ref(b.size());
  conv3d_forward(g, x.data(), w.data(), b.data(), y.data());
  conv3d_forward_ref(g, x.data(), w.data(), b.data(), y_ref.data());
  conv3d_backward_data(g, dy.data(), w.data(), dx.data());
  conv3d_backward_data_ref(g, dy.data(), w.data(), dx_ref.data());
  conv3d_backward_weights(g, dy.data(), x.data(), dw.data(), db.data());
  conv3d_backward_weights_ref(g, dy.data(), x.data(), dw_ref.data(), db_ref.data());
  const std::string s = g.str();
  return close_to_reference(y, y_ref, s + " forward") &&
         close_to_reference(dx, dx_ref, s + " backward-data") &&
         close_to_reference(dw, dw_ref, s + " backward-weights dw") &&
         close_to_reference(db, db_ref, s + " backward-weights db");
}

// ---------------------------------------------------------------------------- direct oneDNN peer

// oneDNN used the way its examples do: one primitive on our channels-last buffers, weights created
// in the primitive's own format (no reorder), library-managed scratchpad. Timing-only: the weight
// contents are whatever oneDNN allocated.
class DirectOneDnn {
 public:
  DirectOneDnn(const ConvGeometry& g, Pass pass, float* x, float* y, float* b)
      : eng_(dnnl::engine::kind::cpu, 0), stream_(eng_) {
    using tag = dnnl::memory::format_tag;
    using dt = dnnl::memory::data_type;
    const dnnl::memory::desc src({g.n, g.cin, g.id, g.ih, g.iw}, dt::f32, tag::ndhwc);
    const dnnl::memory::desc dst({g.n, g.cout, g.od, g.oh, g.ow}, dt::f32, tag::ndhwc);
    const dnnl::memory::desc wany({g.cout, g.cin, g.k, g.k, g.k}, dt::f32, tag::any);
    const dnnl::memory::desc bias({g.cout}, dt::f32, tag::a);
    const dnnl::memory::dims s{g.stride, g.stride, g.stride}, p{g.pad, g.pad, g.pad};
    if (g.transposed)
      build<dnnl::deconvolution_forward, dnnl::deconvolution_backward_data,
            dnnl::deconvolution_backward_weights>(dnnl::algorithm::deconvolution_direct, pass, src,
                                                  dst, wany, bias, s, p, x, y, b);
    else
      build<dnnl::convolution_forward, dnnl::convolution_backward_data,
            dnnl::convolution_backward_weights>(dnnl::algorithm::convolution_direct, pass, src, dst,
                                                wany, bias, s, p, x, y, b);
  }
  void run() {
    prim_.execute(stream_, args_);
    stream_.wait();
  }

 private:
  template <class Fwd, class BwdD, class BwdW>
  void build(dnnl::algorithm algo, Pass pass, const dnnl::memory::desc& src,
             const dnnl::memory::desc& dst, const dnnl::memory::desc& wany,
             const dnnl::memory::desc& bias, const dnnl::memory::dims& s,
             const dnnl::memory::dims& p, float* x, float* y, float* b) {
    typename Fwd::primitive_desc fwd(
        typename Fwd::desc(dnnl::prop_kind::forward_training, algo, src, wany, bias, dst, s, p, p),
        eng_);
    if (pass == Pass::Forward) {
      prim_ = Fwd(fwd);
      args_ = {{DNNL_ARG_SRC, dnnl::memory(src, eng_, x)},
               {DNNL_ARG_WEIGHTS, dnnl::memory(fwd.weights_desc(), eng_)},
               {DNNL_ARG_BIAS, dnnl::memory(bias, eng_, b)},
               {DNNL_ARG_DST, dnnl::memory(dst, eng_, y)}};
    } else if (pass == Pass::BackwardData) {
      typename BwdD::primitive_desc pd(typename BwdD::desc(algo, src, wany, dst, s, p, p), eng_,
                                       fwd);
      prim_ = BwdD(pd);
      args_ = {{DNNL_ARG_DIFF_SRC, dnnl::memory(src, eng_, x)},
               {DNNL_ARG_WEIGHTS, dnnl::memory(pd.weights_desc(), eng_)},
               {DNNL_ARG_DIFF_DST, dnnl::memory(dst, eng_, y)}};
    } else {
      typename BwdW::primitive_desc pd(typename BwdW::desc(algo, src, wany, bias, dst, s, p, p),
                                       eng_, fwd);
      prim_ = BwdW(pd);
      args_ = {{DNNL_ARG_SRC, dnnl::memory(src, eng_, x)},
               {DNNL_ARG_DIFF_WEIGHTS, dnnl::memory(pd.diff_weights_desc(), eng_)},
               {DNNL_ARG_DIFF_BIAS, dnnl::memory(bias, eng_, b)},
               {DNNL_ARG_DIFF_DST, dnnl::memory(dst, eng_, y)}};
    }
  }

  dnnl::engine eng_;
  dnnl::stream stream_;
  dnnl::primitive prim_;
  std::unordered_map<int, dnnl::memory> args_;
};

// ---------------------------------------------------------------------------- timing

template <class F>
double median_seconds(F&& f, int reps) {
  f();  // warm-up: primitive creation, JIT, first touch
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t.size() % 2 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
}

struct BenchCase {
  std::string name;
  ConvGeometry g;
};

struct Options {
  int threads = 2;
  int reps = 7;
  bool json = false;
  bool quick = false;
  std::string only;
  ConvChoiceMode mode = ConvChoiceMode::Auto;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> int {
      MEDSEG_CHECK(i + 1 < argc, name, " needs a value");
      const std::string v = argv[++i];
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      MEDSEG_CHECK(end && *end == '\0' && n > 0, name, " needs a positive integer, got '", v, "'");
      return static_cast<int>(n);
    };
    if (a == "--threads")
      o.threads = value("--threads");
    else if (a == "--reps")
      o.reps = value("--reps");
    else if (a == "--json")
      o.json = true;
    else if (a == "--quick")
      o.quick = true;
    else if (a == "--case" && i + 1 < argc)
      o.only = argv[++i];
    else if (a == "--fixed")
      o.mode = ConvChoiceMode::Fixed;
    else if (a == "--measure")
      o.mode = ConvChoiceMode::Measure;
    else
      MEDSEG_CHECK(
          false, "unknown option '", a,
          "' (usage: bench_conv [--threads N] [--reps N] [--json] [--quick] [--case TEXT] "
          "[--fixed | --measure])");
  }
  MEDSEG_CHECK(o.reps >= 5, "--reps ", o.reps, ": the median needs at least 5 timed runs");
  return o;
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

std::string load_average() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

int run(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  set_num_threads(opt.threads);
  set_conv_choice_mode(opt.mode);

  const bool ok =
      validate_against_reference(ConvGeometry::conv(Shape{2, 7, 6, 5, 16}, 16, 3, 1, 1), 1) &&
      validate_against_reference(ConvGeometry::conv(Shape{1, 7, 8, 5, 1}, 16, 3, 1, 1), 2) &&
      validate_against_reference(ConvGeometry::conv(Shape{1, 7, 6, 9, 16}, 32, 3, 2, 1), 3) &&
      validate_against_reference(ConvGeometry::transpose2(Shape{1, 3, 5, 4, 32}, 16), 4);
  if (!ok) return 1;
  std::cerr << "bench_conv: fast path matches the reference (relative tolerance " << kRelTol
            << ")\n";

  std::vector<BenchCase> cases = {
      {"16->16 64^3", ConvGeometry::conv(Shape{2, 64, 64, 64, 16}, 16, 3, 1, 1)},
      {"32->32 32^3", ConvGeometry::conv(Shape{2, 32, 32, 32, 32}, 32, 3, 1, 1)},
      {"cat 32->16 64^3", ConvGeometry::conv(Shape{2, 64, 64, 64, 32}, 16, 3, 1, 1)},
      {"64->64 16^3", ConvGeometry::conv(Shape{2, 16, 16, 16, 64}, 64, 3, 1, 1)},
      {"cat 128->64 16^3", ConvGeometry::conv(Shape{2, 16, 16, 16, 128}, 64, 3, 1, 1)},
      {"128->128 8^3", ConvGeometry::conv(Shape{2, 8, 8, 8, 128}, 128, 3, 1, 1)},
      {"64->64 8^3", ConvGeometry::conv(Shape{2, 8, 8, 8, 64}, 64, 3, 1, 1)},
      {"cat 128->64 8^3", ConvGeometry::conv(Shape{2, 8, 8, 8, 128}, 64, 3, 1, 1)},
      {"32->32 8^3", ConvGeometry::conv(Shape{2, 8, 8, 8, 32}, 32, 3, 1, 1)},
      {"128->128 16^3", ConvGeometry::conv(Shape{2, 16, 16, 16, 128}, 128, 3, 1, 1)},
      {"1->16 64^3", ConvGeometry::conv(Shape{2, 64, 64, 64, 1}, 16, 3, 1, 1)},
      {"down 16->32 s2", ConvGeometry::conv(Shape{2, 64, 64, 64, 16}, 32, 3, 2, 1)},
      {"up T 32->16", ConvGeometry::transpose2(Shape{2, 32, 32, 32, 32}, 16)},
  };
  if (opt.quick) cases.resize(1);
  if (!opt.only.empty())
    std::erase_if(cases,
                  [&](const BenchCase& c) { return c.name.find(opt.only) == std::string::npos; });
  MEDSEG_CHECK(!cases.empty(), "--case '", opt.only, "' matches no benchmark case");

  const std::string cpu = cpu_model();
  if (!opt.json) {
    std::printf("bench_conv: %s, %d threads, oneDNN %s (%s), median of %d runs, load %s\n",
                cpu.c_str(), opt.threads, onednn_version(), onednn_isa(), opt.reps,
                load_average().c_str());
    std::printf("%-16s %-17s %9s %9s %13s %6s\n", "case", "pass", "ms", "GFLOP/s", "direct GFLOP/s",
                "ratio");
  }
  Rng rng(42);
  for (const BenchCase& c : cases) {
    const ConvGeometry& g = c.g;
    auto x = random_values(g.in_shape().numel(), rng);
    auto w = random_values(g.weight_shape().numel(), rng);
    auto b = random_values(g.cout, rng);
    auto dy = random_values(g.out_shape().numel(), rng);
    std::vector<float> y(dy.size()), dx(x.size()), dw(w.size()), db(b.size());
    for (Pass pass : {Pass::Forward, Pass::BackwardData, Pass::BackwardWeights}) {
      double ours = 0.0, direct = 0.0;
      if (pass == Pass::Forward) {
        ours = median_seconds([&] { conv3d_forward(g, x.data(), w.data(), b.data(), y.data()); },
                              opt.reps);
        DirectOneDnn peer(g, pass, x.data(), y.data(), b.data());
        direct = median_seconds([&] { peer.run(); }, opt.reps);
      } else if (pass == Pass::BackwardData) {
        ours = median_seconds([&] { conv3d_backward_data(g, dy.data(), w.data(), dx.data()); },
                              opt.reps);
        DirectOneDnn peer(g, pass, dx.data(), dy.data(), b.data());
        direct = median_seconds([&] { peer.run(); }, opt.reps);
      } else {
        ours = median_seconds(
            [&] { conv3d_backward_weights(g, dy.data(), x.data(), dw.data(), db.data()); },
            opt.reps);
        DirectOneDnn peer(g, pass, x.data(), dy.data(), db.data());
        direct = median_seconds([&] { peer.run(); }, opt.reps);
      }
      const double gf = g.flops() / ours * 1e-9, gf_direct = g.flops() / direct * 1e-9;
      if (opt.json) {
        nlohmann::json j = {{"bench", "conv"},           {"case", c.name},
                            {"geometry", g.str()},       {"pass", pass_name(pass)},
                            {"threads", opt.threads},    {"reps", opt.reps},
                            {"ms", ours * 1e3},          {"gflops", gf},
                            {"direct_ms", direct * 1e3}, {"direct_gflops", gf_direct},
                            {"ratio", gf / gf_direct},   {"cpu", cpu},
                            {"isa", onednn_isa()},       {"onednn", onednn_version()}};
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("%-16s %-17s %9.2f %9.1f %13.1f %6.2f\n", c.name.c_str(), pass_name(pass),
                    ours * 1e3, gf, gf_direct, gf / gf_direct);
      }
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "bench_conv: " << e.what() << "\n";
    return 2;
  }
}
