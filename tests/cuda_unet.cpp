// The whole U-Net on the GPU against the same network on the CPU: one training step (logits, loss,
// every parameter gradient, running statistics, norm diagnostics), one optimizer step (weights), and
// inference (unfolded and folded). Both networks start from the same seed; the GPU one is moved
// with UNet::to(Device::CUDA) and fed host tensors, as the trainer and the sliding window do. TF32
// is off: the only differences are the summation orders of cuDNN and oneDNN, so every tensor must
// agree to 1e-3 of its largest magnitude (fp32 through a dozen normalized layers; a wrong index, a
// missing term or a stale buffer is off by O(1)). Without a device every test skips with
// "no CUDA device".
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/rng.hpp"
#include "nn/deep_supervision.hpp"
#include "nn/device_ops.hpp"
#include "nn/optimizer.hpp"
#include "nn/unet.hpp"
#ifdef MEDSEG_HAVE_CUDA
#include "kernels/cuda/device.hpp"
#include "nn/device_ops_cuda.hpp"
#endif

namespace medseg {
namespace {

#define MEDSEG_REQUIRE_CUDA_NET()                                                   \
  do {                                                                              \
    try {                                                                           \
      nn::use_cuda_device(0, /*allow_tf32=*/false);                                 \
    } catch (const CudaError& e) {                                                  \
      GTEST_SKIP() << "no CUDA device: " << e.what();                               \
    }                                                                               \
    nn::set_cuda_allow_tf32(false);                                                 \
  } while (0)

// For parameter k named "X.bias", the largest magnitude of X.weight's gradient (grad) or value;
// 0 for every other parameter.
double sibling_weight_scale(const std::vector<nn::NamedTensor>& params, size_t k, bool grad) {
  const std::string& name = params[k].name;
  const std::string suffix = ".bias";
  if (name.size() < suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix))
    return 0;
  const std::string weight = name.substr(0, name.size() - suffix.size()) + ".weight";
  double scale = 0;
  for (const auto& p : params)
    if (p.name == weight)
      for (float v : (grad ? *p.grad : *p.value).to_vector())
        scale = std::max(scale, static_cast<double>(std::fabs(v)));
  return scale;
}

// max |got - want| <= rel * max |want| (+ a floor for all-zero tensors); names the first offenders.
// floor_scale: a magnitude the error may scale with when the exact value is (near) zero.
void expect_close_rel(const std::vector<float>& got, const std::vector<float>& want, double rel,
                      const std::string& what, double floor_scale = 0) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (float w : want) scale = std::max(scale, static_cast<double>(std::fabs(w)));
  const double tol = rel * std::max({scale, floor_scale, 1e-6});
  int64_t bad = 0;
  double worst = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(d <= tol)) {  // NaN fails too
      if (bad < 6) first << "\n  [" << i << "] cuda " << got[i] << " cpu " << want[i];
      ++bad;
    }
    if (std::isfinite(d)) worst = std::max(worst, d);
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " values differ by more than "
                    << tol << " (" << rel << " x max |cpu| " << scale << "), worst " << worst
                    << "; first:" << first.str();
}

Tensor random_input(const Shape& s, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(static_cast<size_t>(s.numel()));
  for (auto& x : v) x = static_cast<float>(rng.normal(0.3, 1.2));
  return Tensor::from(s, v);
}

std::vector<uint16_t> random_labels(const Shape& s, int classes, uint64_t seed) {
  Rng rng(seed);
  std::vector<uint16_t> l(static_cast<size_t>(s.per_channel()));
  // Blocks of one class (a random field of single voxels would make Dice meaningless).
  for (int64_t i = 0; i < static_cast<int64_t>(l.size()); ++i) {
    const int64_t w = i % s.w, h = (i / s.w) % s.h;
    l[static_cast<size_t>(i)] = static_cast<uint16_t>(((w / 4) + (h / 4) + (rng.below(5) == 0)) % classes);
  }
  return l;
}

struct Case {
  const char* name;
  cpu::NormKind kind;
  int levels;
  bool deep_supervision;
  Shape input;
};

void compare_training_step(const Case& c) {
  SCOPED_TRACE(c.name);
  nn::UNetConfig cfg;
  cfg.in_channels = c.input.c;
  cfg.num_classes = 3;
  cfg.levels = c.levels;
  cfg.base_filters = 4;
  cfg.norm.kind = c.kind;
  cfg.deep_supervision = c.deep_supervision;
  nn::UNet cpu_net(cfg, 11), gpu_net(cfg, 11);
  gpu_net.to(Device::CUDA);
  ASSERT_EQ(gpu_net.device(), Device::CUDA);
  for (auto* n : {&cpu_net, &gpu_net}) n->set_renorm_clips(1.5f, 0.5f);  // clipping active

  const Tensor x = random_input(c.input, 5);
  const auto labels = random_labels(c.input, cfg.num_classes, 6);
  nn::OptimizerConfig ocfg;
  nn::Optimizer cpu_opt(ocfg, cpu_net.parameters()), gpu_opt(ocfg, gpu_net.parameters());

  for (int step = 0; step < 2; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    Tensor dl_cpu, dl_gpu;
    nn::SupervisionBuffers sup_cpu, sup_gpu;
    const Tensor& lc = cpu_net.forward_train(x);
    const Tensor& lg = gpu_net.forward_train(x);
    ASSERT_EQ(lg.device(), Device::CUDA);
    expect_close_rel(lg.to_vector(), lc.to_vector(), 1e-3, "logits");
    for (size_t i = 0; i < cpu_net.aux_logits().size(); ++i)
      expect_close_rel(gpu_net.aux_logits()[i].to_vector(), cpu_net.aux_logits()[i].to_vector(), 1e-3,
                       "auxiliary logits " + std::to_string(i));
    const auto rc = nn::supervised_loss(cpu_net, lc, labels.data(), dl_cpu, sup_cpu);
    const auto rg = nn::supervised_loss(gpu_net, lg, labels.data(), dl_gpu, sup_gpu);
    EXPECT_NEAR(rg.loss, rc.loss, 1e-4 * std::fabs(rc.loss) + 1e-6);
    EXPECT_NEAR(rg.ce, rc.ce, 1e-4 * std::fabs(rc.ce) + 1e-6);
    EXPECT_NEAR(rg.soft_dice, rc.soft_dice, 1e-4);
    ASSERT_EQ(dl_gpu.device(), Device::CUDA);
    expect_close_rel(dl_gpu.to_vector(), dl_cpu.to_vector(), 1e-3, "dlogits");
    cpu_net.backward(dl_cpu, &sup_cpu.aux_dlogits);
    gpu_net.backward(dl_gpu, &sup_gpu.aux_dlogits);

    const auto pc = cpu_net.parameters(), pg = gpu_net.parameters();
    ASSERT_EQ(pc.size(), pg.size());
    for (size_t k = 0; k < pc.size(); ++k) {
      ASSERT_EQ(pg[k].name, pc[k].name);
      EXPECT_EQ(pg[k].grad->device(), Device::CUDA) << pg[k].name;
      // Gradients pass the whole backward: allow 2e-3 of the tensor's largest magnitude. The bias
      // of a convolution followed by a norm has an exact gradient of 0 (the norm removes any
      // per-channel shift), so both sides hold only the rounding of a sum that cancels, ~1e-9
      // (seen on an H200): its error is measured against the same conv's weight gradient.
      expect_close_rel(pg[k].grad->to_vector(), pc[k].grad->to_vector(), 2e-3,
                       "gradient " + pc[k].name, sibling_weight_scale(pc, k, true));
    }
    const auto bc = cpu_net.buffers(), bg = gpu_net.buffers();
    for (size_t k = 0; k < bc.size(); ++k)
      expect_close_rel(bg[k].value->to_vector(), bc[k].value->to_vector(), 1e-4, "buffer " + bc[k].name);
    const auto dc = cpu_net.diagnostics(), dg = gpu_net.diagnostics();
    EXPECT_NEAR(dg.mean_abs_log_r, dc.mean_abs_log_r, 1e-3 * dc.mean_abs_log_r + 1e-6);
    EXPECT_NEAR(dg.mean_abs_d, dc.mean_abs_d, 1e-3 * dc.mean_abs_d + 1e-6);
    EXPECT_EQ(dg.skipped_updates, dc.skipped_updates);

    const double nc = cpu_opt.step(0.01), ng = gpu_opt.step(0.01);
    EXPECT_NEAR(ng, nc, 1e-3 * nc) << "gradient norm";
    for (size_t k = 0; k < pc.size(); ++k)
      expect_close_rel(pg[k].value->to_vector(), pc[k].value->to_vector(), 1e-4,
                       "weight " + pc[k].name, sibling_weight_scale(pc, k, false));
  }

  // Inference with the running statistics: host input, host logits, unfolded then folded.
  for (bool fold : {false, true}) {
    SCOPED_TRACE(fold ? "folded" : "unfolded");
    if (fold) {
      cpu_net.fold_norms();
      gpu_net.fold_norms();
    }
    Tensor oc, og;
    cpu_net.forward_infer(x, oc);
    gpu_net.forward_infer(x, og);
    ASSERT_EQ(og.device(), Device::CPU) << "logits come back to the input's device";
    expect_close_rel(og.to_vector(), oc.to_vector(), 1e-3, "inference logits");
  }
}

TEST(CudaUNet, BatchRenormTrainingStepMatchesCpu) {
  MEDSEG_REQUIRE_CUDA_NET();
  compare_training_step({"batchrenorm, 3 levels, N=2, odd channel count", cpu::NormKind::BatchRenorm, 3,
                         false, Shape{2, 16, 12, 8, 2}});
}

TEST(CudaUNet, BatchNormAndInstanceNormTrainingStepsMatchCpu) {
  MEDSEG_REQUIRE_CUDA_NET();
  compare_training_step({"batchnorm, N=1", cpu::NormKind::BatchNorm, 3, false, Shape{1, 8, 16, 12, 1}});
  compare_training_step({"instancenorm", cpu::NormKind::InstanceNorm, 2, false, Shape{2, 6, 10, 4, 1}});
}

TEST(CudaUNet, DeepSupervisionTrainingStepMatchesCpu) {
  MEDSEG_REQUIRE_CUDA_NET();
  compare_training_step({"batchrenorm, 4 levels, deep supervision", cpu::NormKind::BatchRenorm, 4, true,
                         Shape{1, 16, 16, 16, 1}});
}

// The caching allocator: after the first training step (tape, workspaces, cuDNN plans), further steps
// (forward, loss, backward, optimizer) call cudaMalloc no more.
TEST(CudaUNet, NoCudaMallocAfterTheFirstTrainingStep) {
  MEDSEG_REQUIRE_CUDA_NET();
#ifdef MEDSEG_HAVE_CUDA
  nn::UNetConfig cfg;
  cfg.levels = 4;
  cfg.base_filters = 8;
  cfg.deep_supervision = true;
  nn::UNet net(cfg, 2);
  net.to(Device::CUDA);
  nn::Optimizer opt(nn::OptimizerConfig{}, net.parameters());
  const Tensor x = random_input(Shape{2, 16, 16, 16, 1}, 1);
  const auto labels = random_labels(x.shape(), cfg.num_classes, 2);
  Tensor dl;
  nn::SupervisionBuffers sup;
  int64_t mallocs_after_first = 0;
  for (int step = 0; step < 4; ++step) {
    const Tensor& lg = net.forward_train(x);
    nn::supervised_loss(net, lg, labels.data(), dl, sup);
    net.backward(dl, &sup.aux_dlogits);
    EXPECT_TRUE(std::isfinite(opt.step(0.01)));
    nn::synchronize_device();
    if (step == 0) mallocs_after_first = cuda::allocator_stats().cuda_malloc_count;
  }
  EXPECT_EQ(cuda::allocator_stats().cuda_malloc_count, mallocs_after_first)
      << "steps 2-4 called cudaMalloc";
#endif
}

// The device memory of a training step, accounted for (the peak-memory target of the issue rests on
// it): after the first step, a step allocates nothing transient (its peak is what is held when it
// starts), and what is held is the network's buffer pool and logits (activation_bytes), the one
// workspace of the context (cuDNN and the norm kernels), and a remainder of parameters, gradients,
// optimizer state, the batch and the loss buffers. A failure prints the breakdown.
TEST(CudaUNet, StepMemoryIsThePoolTheWorkspaceAndTheParameters) {
  MEDSEG_REQUIRE_CUDA_NET();
#ifdef MEDSEG_HAVE_CUDA
  cuda::release_cached_blocks();
  const size_t base = cuda::allocator_stats().bytes_in_use;  // whatever earlier tests still hold
  nn::UNetConfig cfg;
  cfg.levels = 4;
  cfg.base_filters = 16;
  nn::UNet net(cfg, 4);
  net.to(Device::CUDA);
  nn::Optimizer opt(nn::OptimizerConfig{}, net.parameters());
  const Tensor x = random_input(Shape{2, 32, 32, 32, 1}, 5).to(Device::CUDA);
  const auto labels = random_labels(x.shape(), cfg.num_classes, 6);
  Tensor dl;
  nn::SupervisionBuffers sup;
  const auto step = [&] {
    const Tensor& lg = net.forward_train(x);
    nn::supervised_loss(net, lg, labels.data(), dl, sup);
    net.backward(dl, &sup.aux_dlogits);
    EXPECT_TRUE(std::isfinite(opt.step(0.01)));
    nn::synchronize_device();
  };
  step();
  const size_t held = cuda::allocator_stats().bytes_in_use - base;
  cuda::reset_peak_bytes();
  step();
  const size_t peak = cuda::allocator_stats().peak_bytes_in_use - base;
  size_t params = 0;
  for (const auto& p : net.parameters()) params += p.value->bytes();
  for (const auto& b : net.buffers()) params += b.value->bytes();
  const size_t activations = net.activation_bytes();
  const size_t workspace = nn::cuda_context().workspace_bytes();
  std::ostringstream breakdown;
  breakdown << "held " << held << " B: activations " << activations << ", workspace " << workspace
            << ", parameters and buffers " << params << " (x4 allowed for gradients and optimizer "
            << "state), batch " << x.bytes() << ", dlogits " << dl.bytes() << "; step peak " << peak;
  EXPECT_LE(peak, held + (size_t{1} << 20)) << "a step allocated transient buffers; " << breakdown.str();
  ASSERT_GE(held, activations + workspace) << breakdown.str();
  const size_t rest = held - activations - workspace;
  // Allocation size classes round blocks over 1 MiB up to a quarter power of two (none of this
  // network's larger buffers: they are powers of two), smaller ones to 512 B.
  EXPECT_LE(rest, 4 * params + x.bytes() + 2 * dl.bytes() + activations / 16 + (size_t{8} << 20))
      << breakdown.str();
#endif
}

// The default rebuilds the norm outputs in the backward instead of keeping them: the same bits
// as keeping them (the rebuild runs the forward's normalize kernel on its cached coefficients, and
// both networks share the context's cuDNN algorithm choices), with less activation memory.
TEST(CudaUNet, RebuildingNormOutputsGivesTheSameBitsAsKeepingThem) {
  MEDSEG_REQUIRE_CUDA_NET();
  nn::UNetConfig cfg;
  cfg.levels = 4;
  cfg.base_filters = 8;
  cfg.deep_supervision = true;
  nn::UNet keep(cfg, 3), rebuild(cfg, 3);
  keep.to(Device::CUDA);
  rebuild.to(Device::CUDA);
  EXPECT_TRUE(rebuild.recompute_activations()) << "the default";
  keep.set_recompute_activations(false);
  const Tensor x = random_input(Shape{2, 16, 16, 16, 1}, 3);
  const auto labels = random_labels(x.shape(), cfg.num_classes, 4);
  nn::Optimizer ok(nn::OptimizerConfig{}, keep.parameters()), orb(nn::OptimizerConfig{}, rebuild.parameters());
  for (int step = 0; step < 3; ++step) {
    std::vector<std::vector<float>> out[2];
    int i = 0;
    for (auto [net, opt] : {std::pair{&keep, &ok}, std::pair{&rebuild, &orb}}) {
      Tensor dl;
      nn::SupervisionBuffers sup;
      const Tensor& lg = net->forward_train(x);
      out[i].push_back(lg.to_vector());
      nn::supervised_loss(*net, lg, labels.data(), dl, sup);
      net->backward(dl, &sup.aux_dlogits);
      for (auto& p : net->parameters()) out[i].push_back(p.grad->to_vector());
      for (auto& b : net->snapshot_buffers()) out[i].push_back(b);
      opt->step(0.01);
      ++i;
    }
    ASSERT_EQ(out[0].size(), out[1].size());
    for (size_t k = 0; k < out[0].size(); ++k)
      EXPECT_EQ(out[0][k], out[1][k]) << "step " << step << " tensor " << k << " (0: logits, then "
                                      << "parameter gradients, then running statistics)";
  }
  EXPECT_LT(rebuild.peak_activation_bytes(), keep.peak_activation_bytes());
}

TEST(CudaUNet, MovingBackToTheCpuKeepsTheWeights) {
  MEDSEG_REQUIRE_CUDA_NET();
  nn::UNetConfig cfg;
  cfg.levels = 3;
  cfg.base_filters = 4;
  nn::UNet a(cfg, 3), b(cfg, 3);
  b.to(Device::CUDA);
  b.to(Device::CPU);
  const auto pa = a.parameters(), pb = b.parameters();
  for (size_t k = 0; k < pa.size(); ++k) {
    EXPECT_EQ(pb[k].value->device(), Device::CPU);
    EXPECT_EQ(pb[k].value->to_vector(), pa[k].value->to_vector()) << pa[k].name;
  }
  // And it still computes there.
  const Tensor x = random_input(Shape{1, 8, 8, 8, 1}, 9);
  Tensor oa, ob;
  a.forward_infer(x, oa);
  b.forward_infer(x, ob);
  EXPECT_EQ(ob.to_vector(), oa.to_vector());
}

}  // namespace
}  // namespace medseg
