#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "core/rng.hpp"
#include "kernels/cpu/ops.hpp"
#include "nn/deep_supervision.hpp"
#include "nn/optimizer.hpp"
#include "nn/model_bundle.hpp"
#include "nn/safetensors.hpp"
#include "nn/unet.hpp"

using namespace medseg;
using namespace medseg::nn;
namespace fs = std::filesystem;

namespace {
UNetConfig tiny(cpu::NormKind kind) {
  UNetConfig c;
  c.in_channels = 2;
  c.num_classes = 3;
  c.levels = 2;
  c.base_filters = 2;
  c.norm.kind = kind;
  c.norm.r_max = 1.5f;
  c.norm.d_max = 0.5f;
  return c;
}
Tensor random_tensor(Shape s, uint64_t seed) {
  Tensor t(s);
  Rng r(seed);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = static_cast<float>(r.normal());
  return t;
}
std::vector<uint16_t> random_labels(int64_t n, int k, uint64_t seed) {
  Rng r(seed);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = static_cast<uint16_t>(r.below(k));
  return v;
}
double loss_of(UNet& net, const Tensor& x, const std::vector<uint16_t>& labels, Tensor* dlogits) {
  const Tensor& logits = net.forward_train(x);
  auto res = cpu::dice_ce_loss_ref(logits.shape(), logits.data(), labels.data(), {}, 1.f,
                                   dlogits ? dlogits->data() : nullptr);
  return res.loss;
}
}  // namespace

TEST(UNet, ParameterNamesAreStableAndUnique) {
  UNet net(tiny(cpu::NormKind::BatchRenorm));
  auto ps = net.parameters();
  std::set<std::string> names;
  for (auto& p : ps) EXPECT_TRUE(names.insert(p.name).second) << p.name;
  EXPECT_TRUE(names.count("enc.0.conv.1.weight"));
  EXPECT_TRUE(names.count("dec.0.up.weight"));
  EXPECT_TRUE(names.count("head.bias"));
  EXPECT_TRUE(names.count("enc.1.norm.0.gamma"));
}

// A weights file with a NaN (a damaged or diverged model) is refused on load, naming the file and
// the tensor, instead of giving a confident garbage mask; the same file without it loads.
TEST(UNet, WeightsWithNonFiniteValuesAreRefusedOnLoad) {
  UNet net(tiny(cpu::NormKind::BatchRenorm));
  const fs::path dir = fs::temp_directory_path() / ("medseg_nan_weights_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path file = dir / "model.safetensors";
  save_safetensors(file, model_tensors(net), {});
  UNet other(tiny(cpu::NormKind::BatchRenorm));
  EXPECT_NO_THROW(load_safetensors(file, model_tensors(other)));
  Tensor& w = *model_tensors(net).at(1).value;
  w.data()[w.numel() - 1] = std::numeric_limits<float>::quiet_NaN();
  save_safetensors(file, model_tensors(net), {});
  try {
    load_safetensors(file, model_tensors(other));
    ADD_FAILURE() << "NaN weights loaded";
  } catch (const IoError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(file.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find(model_tensors(net).at(1).name), std::string::npos) << msg;
    EXPECT_NE(msg.find("non-finite"), std::string::npos) << msg;
  }
  fs::remove_all(dir);
}

TEST(UNet, RejectsSpatialSizesNotDivisibleByTheDownsampling) {
  UNet net(tiny(cpu::NormKind::BatchRenorm));
  Tensor x = Tensor::zeros(Shape{1, 5, 4, 4, 2});
  EXPECT_THROW(net.forward_train(x), ArgumentError);
}

// Whole-network finite differences with the naive kernels. Batch renorm's backward treats r and d as
// constants (stop-gradient), so a finite difference matches it only where r and d do not move with the
// parameters: the renorm case freezes the running statistics (alpha = 0) at values far from the batch
// statistics, so that both clips bind (r = 1/r_max, d = -d_max) in every evaluation, exercising the
// r, d != 1, 0 paths of the backward.
TEST(UNet, WholeNetworkGradientMatchesFiniteDifferences) {
  for (auto kind : {cpu::NormKind::BatchNorm, cpu::NormKind::InstanceNorm, cpu::NormKind::BatchRenorm}) {
    UNetConfig cfg = tiny(kind);
    if (kind == cpu::NormKind::BatchRenorm) {
      cfg.norm.alpha = 0.f;
      cfg.norm.r_max = 1.5f;
      cfg.norm.d_max = 0.25f;
    }
    UNet net(cfg, 11);
    if (kind == cpu::NormKind::BatchRenorm)
      for (auto& b : net.buffers()) b.value->fill(b.name.ends_with("running_std") ? 100.f : 50.f);
    net.set_use_reference(true);
    Tensor x = random_tensor(Shape{2, 4, 4, 4, 2}, 5);
    auto labels = random_labels(2 * 64, 3, 6);
    Tensor dlogits(Shape{2, 4, 4, 4, 3});
    loss_of(net, x, labels, &dlogits);
    net.backward(dlogits);
    for (auto& p : net.parameters()) {
      // Probe a few entries of every parameter tensor.
      for (int64_t i = 0; i < p.value->numel(); i += std::max<int64_t>(1, p.value->numel() / 3)) {
        const float orig = p.value->data()[i];
        const float analytic = p.grad->data()[i];
        // h = 3e-4: small enough that few LeakyReLU kinks are crossed (at 1e-2 some pre-activations
        // change sign and the quotient is off by 20%), large enough that the float forward's ~1e-7
        // relative rounding gives a quotient error of ~1e-4 on a loss of order 1.
        const float h = 3e-4f;
        p.value->data()[i] = orig + h;
        const double fp = loss_of(net, x, labels, nullptr);
        p.value->data()[i] = orig - h;
        const double fm = loss_of(net, x, labels, nullptr);
        p.value->data()[i] = orig;
        const double num = (fp - fm) / (2 * h);
        EXPECT_NEAR(analytic, num, 5e-4 + 2e-2 * std::abs(num))
            << norm_kind_name(kind) << " " << p.name << "[" << i << "]";
      }
    }
  }
}

TEST(UNet, FastKernelsMatchReferenceKernels) {
  UNetConfig cfg = tiny(cpu::NormKind::BatchRenorm);
  cfg.levels = 3;
  cfg.base_filters = 4;
  UNet a(cfg, 3), b(cfg, 3);
  b.set_use_reference(true);
  Tensor x = random_tensor(Shape{2, 8, 8, 12, 2}, 1);
  const Tensor& la = a.forward_train(x);
  const Tensor& lb = b.forward_train(x);
  double maxdiff = 0, maxabs = 0;
  for (int64_t i = 0; i < la.numel(); ++i) {
    maxdiff = std::max(maxdiff, static_cast<double>(std::abs(la.data()[i] - lb.data()[i])));
    maxabs = std::max(maxabs, static_cast<double>(std::abs(lb.data()[i])));
  }
  // float vs double accumulation through 7 conv layers: relative 1e-4 of the output range.
  EXPECT_LE(maxdiff, 1e-4 * std::max(1.0, maxabs));
}

TEST(UNet, TrainingDecreasesTheLossOnATinyProblem) {
  UNetConfig cfg = tiny(cpu::NormKind::BatchRenorm);
  cfg.in_channels = 1;
  cfg.base_filters = 4;
  UNet net(cfg, 2);
  // Label = 1 where the image is bright, 2 where it is dark, 0 elsewhere.
  Tensor x(Shape{2, 8, 8, 8, 1});
  std::vector<uint16_t> labels(x.numel());
  Rng r(3);
  for (int64_t i = 0; i < x.numel(); ++i) {
    double v = r.normal();
    x.data()[i] = static_cast<float>(v);
    labels[i] = v > 0.7 ? 1 : (v < -0.7 ? 2 : 0);
  }
  OptimizerConfig oc;
  Optimizer opt(oc, net.parameters());
  Tensor dlogits(Shape{2, 8, 8, 8, 3});
  double first = 0, last = 0;
  for (int it = 0; it < 100; ++it) {
    double l = loss_of(net, x, labels, &dlogits);
    net.backward(dlogits);
    opt.step(poly_lr(oc.lr, it, 100, 0.9));
    if (it == 0) first = l;
    last = l;
  }
  EXPECT_LT(last, first - 0.3) << "first " << first << " last " << last;
}

TEST(UNet, FoldedInferenceEqualsUnfoldedInference) {
  UNetConfig cfg = tiny(cpu::NormKind::BatchRenorm);
  cfg.levels = 3;
  cfg.base_filters = 4;
  UNet net(cfg, 9);
  Tensor x = random_tensor(Shape{2, 8, 8, 8, 2}, 4);
  for (int i = 0; i < 3; ++i) net.forward_train(x);  // move the running statistics off their init
  Tensor a, b;
  net.forward_infer(x, a);
  net.fold_norms();
  net.forward_infer(x, b);
  ASSERT_TRUE(net.folded());
  double maxdiff = 0;
  for (int64_t i = 0; i < a.numel(); ++i)
    maxdiff = std::max(maxdiff, static_cast<double>(std::abs(a.data()[i] - b.data()[i])));
  EXPECT_LT(maxdiff, 1e-4);  // float reassociation of the folded products
}

// Training-mode evaluation leaves the running statistics alone. For batch renorm with clips that do
// not bind, the training-mode output equals the inference output (r and d map the batch statistics
// onto the running ones: the whole point of the method); with r_max = 1, d_max = 0 (plain batch
// norm) and for batchnorm it follows the batch and differs.
TEST(UNet, BatchStatisticsForwardKeepsRunningStatistics) {
  for (auto kind : {cpu::NormKind::BatchRenorm, cpu::NormKind::BatchNorm}) {
    UNetConfig cfg = tiny(kind);
    cfg.levels = 3;
    cfg.base_filters = 4;
    UNet net(cfg, 5);
    Tensor x = random_tensor(Shape{2, 8, 8, 8, 2}, 4);
    for (int i = 0; i < 3; ++i) net.forward_train(random_tensor(Shape{2, 8, 8, 8, 2}, 10 + i));
    std::vector<std::vector<float>> before;
    for (auto& b : net.buffers()) before.push_back(b.value->to_vector());
    net.set_renorm_clips(1e6f, 1e6f);
    Tensor train_mode, infer_mode;
    net.forward_batch_stats(x, train_mode);
    size_t k = 0;
    for (auto& b : net.buffers()) EXPECT_EQ(b.value->to_vector(), before[k++]) << b.name;
    net.forward_infer(x, infer_mode);
    double maxdiff = 0;
    for (int64_t i = 0; i < infer_mode.numel(); ++i)
      maxdiff = std::max(maxdiff, static_cast<double>(std::abs(train_mode.data()[i] - infer_mode.data()[i])));
    if (kind == cpu::NormKind::BatchRenorm) {
      EXPECT_LT(maxdiff, 1e-3);
      net.set_renorm_clips(1.f, 0.f);
      net.forward_batch_stats(x, train_mode);
      double d2 = 0;
      for (int64_t i = 0; i < infer_mode.numel(); ++i)
        d2 = std::max(d2, static_cast<double>(std::abs(train_mode.data()[i] - infer_mode.data()[i])));
      EXPECT_GT(d2, 1e-2);
    } else {
      EXPECT_GT(maxdiff, 1e-2);
    }
  }
}

TEST(Safetensors, RoundTripRestoresEveryTensorAndMetadata) {
  UNetConfig cfg = tiny(cpu::NormKind::BatchRenorm);
  UNet a(cfg, 1), b(cfg, 2);
  auto dir = std::filesystem::temp_directory_path() / "medseg_st_test";
  std::filesystem::create_directories(dir);
  auto path = dir / "w.safetensors";
  auto pa = a.parameters();
  save_safetensors(path, pa, {{"format", "medseg"}});
  auto pb = b.parameters();
  auto meta = load_safetensors(path, pb);
  EXPECT_EQ(meta["format"], "medseg");
  for (size_t k = 0; k < pa.size(); ++k)
    for (int64_t i = 0; i < pa[k].value->numel(); ++i)
      ASSERT_EQ(pa[k].value->data()[i], pb[k].value->data()[i]) << pa[k].name;
  // A truncated file is an IoError naming the file.
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 10);
  try {
    load_safetensors(path, pb);
    FAIL();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos);
  }
  std::filesystem::remove_all(dir);
}

// The header is checked field by field: a permuted shape with the same count (another layout's
// weights), a shape or offsets of the wrong JSON type, metadata that is not a string: IoErrors
// naming the file and the tensor, not JSON library exceptions.
TEST(Safetensors, MalformedHeaderFieldsAreIoErrorsNamingTheTensor) {
  UNetConfig cfg = tiny(cpu::NormKind::BatchRenorm);
  UNet a(cfg, 1);
  auto params = a.parameters();
  const auto dir = std::filesystem::temp_directory_path() /
                   ("medseg_st_malformed_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "w.safetensors";
  save_safetensors(path, params, {{"format", "medseg"}});
  const std::string original = read_file(path);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(original[i])) << (8 * i);
  const nlohmann::json header = nlohmann::json::parse(original.substr(8, n));
  // The first 5-D tensor (a convolution's weights, Cout x 3 x 3 x 3 x Cin, Cout != Cin).
  std::string conv;
  for (const auto& p : params)
    if (header.at(p.name).at("shape").size() == 5 &&
        header.at(p.name).at("shape")[0] != header.at(p.name).at("shape")[4]) {
      conv = p.name;
      break;
    }
  ASSERT_FALSE(conv.empty());
  const auto rewrite = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json h = header;
    edit(h);
    std::string text = h.dump();
    while (text.size() < n) text.push_back(' ');
    ASSERT_LE(text.size(), n) << "edited header longer than the original";
    write_text_file_atomic(path, original.substr(0, 8) + text + original.substr(8 + n));
  };
  struct Case {
    const char* what;
    std::function<void(nlohmann::json&)> edit;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"permuted shape",
       [&](nlohmann::json& h) {
         auto& s = h[conv]["shape"];
         std::swap(s[0], s[4]);
       },
       "'" + conv + "' has shape"},
      {"shape of strings", [&](nlohmann::json& h) { h[conv]["shape"] = {"a", "b"}; },
       "'" + conv + "' is malformed"},
      {"offsets of strings", [&](nlohmann::json& h) { h[conv]["data_offsets"] = {"0", "8"}; },
       "'" + conv + "' is malformed"},
      {"metadata number", [&](nlohmann::json& h) { h["__metadata__"]["format"] = 7; },
       "__metadata__ value 'format'"},
  };
  for (const auto& c : cases) {
    rewrite(c.edit);
    if (HasFatalFailure()) break;
    UNet b(cfg, 2);
    auto pb = b.parameters();
    try {
      load_safetensors(path, pb);
      ADD_FAILURE() << c.what << ": accepted";
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(c.expect), std::string::npos) << c.what << ": " << e.what();
    }
  }
  std::filesystem::remove_all(dir);
}

TEST(DeepSupervision, WeightsHalvePerLevelAndSumToOne) {
  UNetConfig c = tiny(cpu::NormKind::BatchNorm);
  c.levels = 5;
  EXPECT_TRUE(c.supervised_levels().empty());  // off by default
  EXPECT_EQ(c.supervision_weights(), std::vector<float>{1.f});
  c.deep_supervision = true;
  EXPECT_EQ(c.supervised_levels(), (std::vector<int>{1, 2}));
  const auto w = c.supervision_weights();  // 1, 1/2, 1/4 normalised
  ASSERT_EQ(w.size(), 3u);
  EXPECT_NEAR(w[0], 4.0 / 7, 1e-7);
  EXPECT_NEAR(w[1], 2.0 / 7, 1e-7);
  EXPECT_NEAR(w[2], 1.0 / 7, 1e-7);
  c.levels = 3;  // the only decoder level below full resolution is the lowest: weight 0, no head
  EXPECT_TRUE(c.supervised_levels().empty());
}

TEST(DeepSupervision, LabelsDownsampleToTheCentreOfEachBlock) {
  const Shape s{1, 4, 4, 8, 1};
  std::vector<uint16_t> labels(static_cast<size_t>(s.per_channel()));
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<uint16_t>(i);
  const auto half = downsample_labels(labels.data(), s, 2);
  ASSERT_EQ(half.size(), 2u * 2 * 4);
  // Output (z, y, x) <- input (2z, 2y, 2x): floor((i + 0.5) * 2 - 0.5) = 2i.
  EXPECT_EQ(half[0], labels[0]);
  EXPECT_EQ(half[1], labels[2]);
  EXPECT_EQ(half[4], labels[(0 * 4 + 2) * 8 + 0]);
  EXPECT_EQ(half[8 + 4 + 3], labels[(2 * 4 + 2) * 8 + 6]);
  const auto quarter = downsample_labels(labels.data(), s, 4);
  ASSERT_EQ(quarter.size(), 2u);
  // floor((i + 0.5) * 4 - 0.5) = 4i + 1.
  EXPECT_EQ(quarter[0], labels[(1 * 4 + 1) * 8 + 1]);
  EXPECT_EQ(quarter[1], labels[(1 * 4 + 1) * 8 + 5]);
  EXPECT_THROW(downsample_labels(labels.data(), s, 3), Error);
}

// Deep supervision adds one term to the loss and one gradient path to the backward. Checked here:
// - the loss over all heads equals w0 * loss(main) + w1 * loss(aux, downsampled labels) computed with
//   the double-precision reference;
// - the backward is the sum of the main-only and auxiliary-only backwards (the auxiliary gradient is
//   added to the decoder's, not substituted for it);
// - the auxiliary-only gradient of the auxiliary head and of the decoder level it sits on against
//   central finite differences of the auxiliary loss alone (a shallow path, so differences are
//   precise; the path further up is the ordinary backward, checked by the whole-network test above -
//   per-entry differences through all four levels are too noisy: float rounding amplified by depth and
//   LeakyReLU kinks give 5-20% errors on single deep entries with or without deep supervision).
TEST(DeepSupervision, LossAndGradientsOfAllHeadsMatchTheReference) {
  UNetConfig cfg = tiny(cpu::NormKind::BatchNorm);
  cfg.levels = 4;
  cfg.deep_supervision = true;
  UNet net(cfg, 21);
  net.set_use_reference(true);
  // 16^3: the bottleneck (1/8) keeps 2 x 2^3 values per channel for batch norm.
  const Tensor x = random_tensor(Shape{2, 16, 16, 16, 2}, 8);
  const auto labels = random_labels(2 * 4096, 3, 9);
  const auto small = downsample_labels(labels.data(), Shape{2, 16, 16, 16, 1}, 2);
  const auto w = cfg.supervision_weights();
  auto main_loss = [&] {
    const Tensor& logits = net.forward_train(x);
    return cpu::dice_ce_loss_ref(logits.shape(), logits.data(), labels.data(), {}, 1.f, nullptr).loss;
  };
  auto aux_loss = [&] {  // after a forward
    const Tensor& aux = net.aux_logits().at(0);
    EXPECT_EQ(aux.shape(), (Shape{2, 8, 8, 8, 3}));
    return cpu::dice_ce_loss_ref(aux.shape(), aux.data(), small.data(), {}, 1.f, nullptr).loss;
  };
  const double lm = main_loss(), la = aux_loss();

  Tensor dlogits;
  SupervisionBuffers buf;
  auto params = net.parameters();
  auto grads = [&] {
    std::vector<std::vector<float>> g;
    for (auto& p : params) g.push_back(p.grad->to_vector());
    return g;
  };
  const auto res = supervised_loss(net, net.forward_train(x), labels.data(), dlogits, buf);
  EXPECT_NEAR(res.loss, w[0] * lm + w[1] * la, 1e-5 * (lm + la));
  net.backward(dlogits, &buf.aux_dlogits);
  const auto g_all = grads();
  Tensor dmain(dlogits.shape());
  dmain.copy_from(dlogits);
  std::vector<Tensor> zero_aux, only_aux;
  zero_aux.push_back(Tensor::zeros(buf.aux_dlogits[0].shape()));
  only_aux.emplace_back(buf.aux_dlogits[0].shape());
  only_aux[0].copy_from(buf.aux_dlogits[0]);
  net.forward_train(x);
  net.backward(dmain, &zero_aux);
  const auto g_main = grads();
  net.forward_train(x);
  net.backward(Tensor::zeros(dmain.shape()), &only_aux);
  const auto g_aux = grads();
  for (size_t k = 0; k < params.size(); ++k) {
    double scale = 0;
    for (float v : g_all[k]) scale = std::max(scale, double(std::abs(v)));
    for (size_t i = 0; i < g_all[k].size(); ++i)
      // The same float operations in another order: a few ulps of the largest entry.
      ASSERT_NEAR(g_all[k][i], g_main[k][i] + g_aux[k][i], 1e-5 * scale + 1e-9) << params[k].name << "[" << i << "]";
  }
  // g_aux is the gradient of w1 * aux_loss.
  int probed = 0;
  for (size_t k = 0; k < params.size(); ++k) {
    auto& p = params[k];
    if (!p.name.starts_with("ds.") && !p.name.starts_with("dec.1.")) continue;
    for (int64_t i = 0; i < p.value->numel(); i += std::max<int64_t>(1, p.value->numel() / 4)) {
      const float orig = p.value->data()[i];
      const float h = 3e-4f;
      p.value->data()[i] = orig + h;
      net.forward_train(x);
      const double fp = w[1] * aux_loss();
      p.value->data()[i] = orig - h;
      net.forward_train(x);
      const double fm = w[1] * aux_loss();
      p.value->data()[i] = orig;
      const double num = (fp - fm) / (2 * h);
      EXPECT_NEAR(g_aux[k][static_cast<size_t>(i)], num, 5e-4 + 2e-2 * std::abs(num)) << p.name << "[" << i << "]";
      ++probed;
    }
  }
  EXPECT_GT(probed, 20);
  // Without the auxiliary gradients the backward refuses (it would silently drop a loss term).
  net.forward_train(x);
  EXPECT_THROW(net.backward(dlogits), Error);
}

// ---- activation memory: rebuilding the norm outputs, the pool ----

namespace {
// Everything one training step produces, as bits: logits, every parameter gradient, the running
// statistics after it.
struct StepBits {
  std::vector<float> logits;
  std::vector<std::vector<float>> grads, buffers;
};
StepBits train_step(UNet& net, Optimizer& opt, const Tensor& x, const std::vector<uint16_t>& labels) {
  Tensor dlogits;
  SupervisionBuffers buf;
  const Tensor& lg = net.forward_train(x);
  StepBits b;
  b.logits = lg.to_vector();
  supervised_loss(net, lg, labels.data(), dlogits, buf);
  net.backward(dlogits, &buf.aux_dlogits);
  for (auto& p : net.parameters()) b.grads.push_back(p.grad->to_vector());
  b.buffers = net.snapshot_buffers();
  opt.step(1e-2);
  return b;
}
}  // namespace

TEST(UNet, RebuildingNormOutputsGivesTheSameBitsAsKeepingThem) {
  for (auto kind : {cpu::NormKind::BatchRenorm, cpu::NormKind::BatchNorm, cpu::NormKind::InstanceNorm})
    for (bool ds : {false, true}) {
      UNetConfig cfg = tiny(kind);
      cfg.in_channels = 1;
      cfg.levels = 4;
      cfg.base_filters = 4;
      cfg.deep_supervision = ds;
      UNet keep(cfg, 5), rebuild(cfg, 5);
      keep.set_recompute_activations(false);
      rebuild.set_recompute_activations(true);
      EXPECT_FALSE(keep.recompute_activations());
      EXPECT_TRUE(rebuild.recompute_activations());
      Optimizer ok(OptimizerConfig{}, keep.parameters()), orb(OptimizerConfig{}, rebuild.parameters());
      const Tensor x = random_tensor(Shape{2, 16, 16, 16, 1}, 6);
      const auto labels = random_labels(2 * 4096, 3, 7);
      const std::string what = std::string(norm_kind_name(kind)) + (ds ? " deep supervision" : "");
      for (int step = 0; step < 3; ++step) {  // later steps: updated weights and running statistics
        const StepBits a = train_step(keep, ok, x, labels), b = train_step(rebuild, orb, x, labels);
        EXPECT_EQ(a.logits, b.logits) << what << " step " << step;
        ASSERT_EQ(a.grads.size(), b.grads.size());
        for (size_t k = 0; k < a.grads.size(); ++k)
          EXPECT_EQ(a.grads[k], b.grads[k]) << what << " step " << step << " " << keep.parameters()[k].name;
        EXPECT_EQ(a.buffers, b.buffers) << what << " step " << step;
      }
      EXPECT_LT(rebuild.peak_activation_bytes(), keep.peak_activation_bytes()) << what;
    }
}

TEST(UNet, TrainingStepHoldsAtMostTheDocumentedBuffers) {
  // 3 levels, base 8: level l has 8 * 2^l channels at (16 / 2^l)^3, so a level-l buffer is 4^-l
  // of a level-0 one, U = 2 x 16^3 x 8 floats, and a concatenation twice that. Counted in U (the
  // rules are at the top of nn/unet.hpp), the peak comes in the level-0 decoder's second block in
  // the forward: held are the conv outputs z of every block so far (encoder 0: 2, level 1: 2/4
  // encoder + 2/4 decoder, bottleneck 2/16), the concatenations (2 + 2/4), and the second block's
  // own input, z0, y0 and z1: 8.625 U. Keeping the norm outputs adds every y: 12.75 U, at the end
  // of the forward.
  UNetConfig cfg = tiny(cpu::NormKind::BatchRenorm);
  cfg.in_channels = 1;
  cfg.levels = 3;
  cfg.base_filters = 8;
  const Tensor x = random_tensor(Shape{2, 16, 16, 16, 1}, 6);
  const auto labels = random_labels(2 * 4096, 3, 7);
  const double U = 2.0 * 4096 * 8 * sizeof(float);
  const double logits = 2.0 * 4096 * 3 * sizeof(float);
  for (bool recompute : {true, false}) {
    UNet net(cfg, 5);
    net.set_recompute_activations(recompute);
    Optimizer opt(OptimizerConfig{}, net.parameters());
    for (int i = 0; i < 2; ++i) train_step(net, opt, x, labels);
    const double bound = recompute ? 8.625 : 12.75;
    const double peak_units = (static_cast<double>(net.peak_activation_bytes()) - logits) / U;
    EXPECT_LE(peak_units, bound) << (recompute ? "rebuilt" : "kept");
    // The step allocates nothing new after the first one.
    const size_t held = net.activation_bytes();
    train_step(net, opt, x, labels);
    EXPECT_EQ(net.activation_bytes(), held);
    // Inference holds far less: no conv output outlives its norm, nothing is kept for a backward;
    // the peak is the level-0 concatenation with its two inputs (4 U).
    UNet inf(cfg, 5);
    Tensor lg;
    inf.forward_infer(x, lg);
    EXPECT_LE((static_cast<double>(inf.peak_activation_bytes()) - logits) / U, 4.0);
  }
}
