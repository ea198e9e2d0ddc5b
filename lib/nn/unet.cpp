#include "nn/unet.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#include "kernels/cpu/ops.hpp"
#include "nn/device_ops.hpp"

namespace medseg::nn {

int64_t UNetConfig::filters(int level) const {
  return std::min<int64_t>(int64_t{base_filters} << level, max_filters);
}

std::vector<int> UNetConfig::supervised_levels() const {
  std::vector<int> out;
  if (deep_supervision)
    for (int l = 1; l <= levels - 3; ++l) out.push_back(l);
  return out;
}

std::vector<float> UNetConfig::supervision_weights() const {
  std::vector<float> w{1.f};
  for (int l : supervised_levels()) w.push_back(std::ldexp(1.f, -l));
  float sum = 0;
  for (float v : w) sum += v;
  for (float& v : w) v /= sum;
  return w;
}

const char* norm_kind_name(cpu::NormKind k) {
  switch (k) {
    case cpu::NormKind::BatchRenorm: return "batchrenorm";
    case cpu::NormKind::BatchNorm: return "batchnorm";
    case cpu::NormKind::InstanceNorm: return "instancenorm";
  }
  return "?";
}

cpu::NormKind parse_norm_kind(const std::string& s) {
  if (s == "batchrenorm" || s == "brn") return cpu::NormKind::BatchRenorm;
  if (s == "batchnorm" || s == "bn") return cpu::NormKind::BatchNorm;
  if (s == "instancenorm" || s == "in") return cpu::NormKind::InstanceNorm;
  throw ArgumentError("unknown norm '" + s + "' (expected batchrenorm, batchnorm or instancenorm)");
}

namespace {
void ensure_on(Tensor& t, const Shape& s, Device d) {
  if (!t.defined() || !(t.shape() == s) || t.device() != d) t = Tensor(s, d);
}
}  // namespace

void UNet::ensure(Tensor& t, const Shape& s) const { ensure_on(t, s, device_); }

const Tensor& UNet::on_device(const Tensor& x) {
  if (x.device() == device_) return x;
  ensure(input_dev_, x.shape());
  input_dev_.copy_from(x);
  return input_dev_;
}

void UNet::to(Device device) {
  if (device == device_) return;
  auto move_stage = [&](Stage& st) {
    for (auto& b : st.blocks) {
      b.conv.to(device);
      b.norm.to(device);
      b.z = Tensor();
      b.y = Tensor();
      b.folded.reset();
    }
  };
  for (auto& st : enc_) move_stage(st);
  for (auto& st : dec_) move_stage(st);
  for (auto& u : up_) u.to(device);
  head_.to(device);
  for (auto& h : aux_heads_) h.to(device);
  folded_ = false;
  device_ = device;
  // The tape is rebuilt on the new device at the next forward.
  in_shape_ = Shape{};
  input_ = nullptr;
  input_dev_ = Tensor();
  cat_.clear();
  dcat_.clear();
  dskip_.clear();
  grad_pool_.clear();
  logits_ = Tensor();
  aux_logits_.clear();
}

UNet::UNet(const UNetConfig& cfg, uint64_t seed)
    : cfg_(cfg), head_(cfg.filters(0), cfg.num_classes, 1, 1, false) {
  MEDSEG_CHECK(cfg.levels >= 1 && cfg.levels <= 7, "levels must be 1..7, got ", cfg.levels);
  MEDSEG_CHECK(cfg.convs_per_stage >= 1, "convs_per_stage ", cfg.convs_per_stage);
  MEDSEG_CHECK(cfg.in_channels >= 1 && cfg.num_classes >= 2, "in_channels ", cfg.in_channels,
               " num_classes ", cfg.num_classes);
  cfg_.norm.leaky = true;
  Rng rng(seed);
  auto make_stage = [&](int64_t cin, int64_t cout, int first_stride) {
    Stage st;
    for (int j = 0; j < cfg_.convs_per_stage; ++j) {
      Block b{ConvLayer(j == 0 ? cin : cout, cout, 3, j == 0 ? first_stride : 1, false),
              NormLayer(cout, cfg_.norm), Tensor(), Tensor(), nullptr};
      b.conv.init_he(rng);
      st.blocks.push_back(std::move(b));
    }
    return st;
  };
  for (int l = 0; l < cfg_.levels; ++l)
    enc_.push_back(make_stage(l == 0 ? cfg_.in_channels : cfg_.filters(l - 1), cfg_.filters(l),
                              l == 0 ? 1 : 2));
  for (int l = 0; l + 1 < cfg_.levels; ++l) {
    up_.emplace_back(cfg_.filters(l + 1), cfg_.filters(l), 2, 2, true);
    up_.back().init_he(rng);
    dec_.push_back(make_stage(2 * cfg_.filters(l), cfg_.filters(l), 1));
  }
  head_.init_he(rng);
  aux_levels_ = cfg_.supervised_levels();
  for (int l : aux_levels_) {
    aux_heads_.emplace_back(cfg_.filters(l), cfg_.num_classes, 1, 1, false);
    aux_heads_.back().init_he(rng);
  }
}

void UNet::allocate(const Shape& in) {
  if (in == in_shape_) return;
  const int64_t div = cfg_.size_divisor();
  MEDSEG_CHECK(in.d % div == 0 && in.h % div == 0 && in.w % div == 0,
               "input spatial size must be divisible by ", div, " for ", cfg_.levels,
               " levels, got ", in);
  MEDSEG_CHECK(in.c == cfg_.in_channels, "network expects ", cfg_.in_channels,
               " input channels, got ", in);
  in_shape_ = in;
  Shape s = in;
  for (int l = 0; l < cfg_.levels; ++l) {
    for (auto& b : enc_[l].blocks) {
      s = b.conv.out_shape(s);
      ensure(b.z, s);
      ensure(b.y, s);
    }
  }
  const int L = cfg_.levels;
  const size_t ups = L > 1 ? L - 1 : 0;
  cat_.resize(ups);
  dcat_.resize(ups);
  dskip_.resize(ups);
  grad_pool_.clear();
  for (int l = L - 2; l >= 0; --l) {
    const Shape skip = enc_[l].blocks.back().y.shape();
    Shape cs = skip;
    cs.c = 2 * skip.c;
    ensure(cat_[l], cs);
    s = cs;
    for (auto& b : dec_[l].blocks) {
      s = b.conv.out_shape(s);
      ensure(b.z, s);
      ensure(b.y, s);
    }
  }
  Shape ls = in;
  ls.c = cfg_.num_classes;
  ensure(logits_, ls);
  aux_logits_.resize(aux_levels_.size());
  for (size_t i = 0; i < aux_levels_.size(); ++i) {
    Shape as = dec_[aux_levels_[i]].blocks.back().y.shape();
    as.c = cfg_.num_classes;
    ensure(aux_logits_[i], as);
  }
}

void UNet::stage_forward(Stage& st, const Tensor& x, bool train) {
  const Tensor* in = &x;
  for (auto& b : st.blocks) {
    if (!train && folded_ && b.folded) {
      b.folded->forward_leaky(*in, b.y, cfg_.norm.slope);  // one pass; z is not needed
    } else {
      b.conv.forward(*in, b.z);
      if (train)
        b.norm.forward_train(b.z, b.y);
      else
        b.norm.forward_infer(b.z, b.y);
    }
    in = &b.y;
  }
}

Tensor& UNet::grad_buffer(const Shape& s, const Tensor* a, const Tensor* b) {
  auto& pool = grad_pool_[{s.n, s.d, s.h, s.w, s.c}];
  for (auto& t : pool)
    if (&t != a && &t != b) return t;
  MEDSEG_CHECK(pool.size() < 3, "gradient pool: a fourth live buffer of shape ", s);
  pool.emplace_back(s, device_);
  return pool.back();
}

void UNet::stage_backward(Stage& st, const Tensor& x, const Tensor& dy, Tensor* dx) {
  const Tensor* g = &dy;
  for (int j = static_cast<int>(st.blocks.size()) - 1; j >= 0; --j) {
    Block& b = st.blocks[j];
    Tensor& dz = grad_buffer(b.z.shape(), g, dx);
    b.norm.backward(*g, b.z, b.y, dz);
    // g is dead now; the gradient w.r.t. this block's input may take its buffer, not dz's.
    const Tensor& in = j == 0 ? x : st.blocks[j - 1].y;
    Tensor* din = j > 0 ? &grad_buffer(in.shape(), &dz, dx) : dx;
    b.conv.backward(dz, in, din);
    g = din;
  }
}

void UNet::run_forward(const Tensor& x, bool train, bool aux, Tensor& logits) {
  const int L = cfg_.levels;
  const Tensor* in = &x;
  for (int l = 0; l < L; ++l) {
    stage_forward(enc_[l], *in, train);
    in = &enc_[l].blocks.back().y;
  }
  for (int l = L - 2; l >= 0; --l) {
    // The up-conv's output only lives until the concat: a pooled gradient buffer serves (no
    // gradient is live during a forward).
    const Tensor& skip = enc_[l].blocks.back().y;
    Tensor& up = grad_buffer(skip.shape(), nullptr, nullptr);
    up_[l].forward(*in, up);
    concat_channels(up, skip, cat_[l]);
    stage_forward(dec_[l], cat_[l], train);
    in = &dec_[l].blocks.back().y;
    if (aux)
      for (size_t i = 0; i < aux_heads_.size(); ++i)
        if (aux_levels_[i] == l) aux_heads_[i].forward(*in, aux_logits_[i]);
  }
  head_.forward(*in, logits);
}

const Tensor& UNet::forward_train(const Tensor& x) {
  folded_ = false;  // the weights are about to change; fold_norms() must run again
  const Tensor& xd = on_device(x);
  allocate(xd.shape());
  input_ = &xd;
  run_forward(xd, true, true, logits_);
  return logits_;
}

void UNet::backward(const Tensor& dlogits, const std::vector<Tensor>* aux_dlogits) {
  check_same_shape(dlogits.shape(), logits_.shape(), "logits gradient");
  MEDSEG_CHECK(input_ != nullptr, "UNet::backward without a training forward");
  const auto& sup = aux_levels_;
  MEDSEG_CHECK(sup.empty() || (aux_dlogits && aux_dlogits->size() == sup.size()),
               "UNet::backward: deep supervision needs ", sup.size(), " auxiliary logit gradients");
  const int L = cfg_.levels;
  // g: the gradient w.r.t. the output of the stage about to be back-propagated.
  const Tensor& top = (L > 1 ? dec_[0] : enc_[0]).blocks.back().y;
  Tensor* g = &grad_buffer(top.shape(), nullptr, nullptr);
  head_.backward(dlogits, top, g);
  for (int l = 0; l + 1 < L; ++l) {
    // An auxiliary head on this decoder output: its gradient adds to the one from above.
    for (size_t i = 0; i < sup.size(); ++i) {
      if (sup[i] != l) continue;
      const Tensor& y = dec_[l].blocks.back().y;
      check_same_shape((*aux_dlogits)[i].shape(), aux_logits_[i].shape(), "auxiliary logits gradient");
      Tensor& da = grad_buffer(y.shape(), g, nullptr);
      aux_heads_[i].backward((*aux_dlogits)[i], y, &da);
      add_inplace(*g, da);
    }
    ensure(dcat_[l], cat_[l].shape());
    stage_backward(dec_[l], cat_[l], *g, &dcat_[l]);
    const int64_t c = enc_[l].blocks.back().y.shape().c;
    ensure(dskip_[l], enc_[l].blocks.back().y.shape());
    Tensor& dup = grad_buffer(dskip_[l].shape(), nullptr, nullptr);
    MEDSEG_CHECK(cat_[l].shape().c == 2 * c, "concat of level ", l, " has ", cat_[l].shape().c,
                 " channels, expected ", 2 * c);
    split_channels(dcat_[l], dup, dskip_[l]);
    // The up-conv's input: the next decoder stage's output, or the bottleneck.
    const Tensor& below = (l + 2 < L ? dec_[l + 1] : enc_[L - 1]).blocks.back().y;
    g = &grad_buffer(below.shape(), &dup, nullptr);
    up_[l].backward(dup, below, g);
  }
  for (int l = L - 1; l >= 0; --l) {
    if (l < L - 1) add_inplace(*g, dskip_[l]);  // skip connection: gradients of both uses add
    if (l == 0) {
      stage_backward(enc_[0], *input_, *g, nullptr);
    } else {
      const Tensor& prev = enc_[l - 1].blocks.back().y;
      Tensor& dprev = grad_buffer(prev.shape(), g, nullptr);
      stage_backward(enc_[l], prev, *g, &dprev);
      g = &dprev;
    }
  }
}

void UNet::forward_to(const Tensor& x, bool train, Tensor& logits) {
  const Tensor& xd = on_device(x);
  allocate(xd.shape());
  if (x.device() == device_) {
    ensure(logits, logits_.shape());
    run_forward(xd, train, false, logits);
  } else {  // back to the caller's device
    run_forward(xd, train, false, logits_);
    ensure_on(logits, logits_.shape(), x.device());
    logits.copy_from(logits_);
  }
}

void UNet::forward_infer(const Tensor& x, Tensor& logits) { forward_to(x, false, logits); }

void UNet::forward_batch_stats(const Tensor& x, Tensor& logits) {
  const auto saved = snapshot_buffers();
  forward_to(x, true, logits);
  restore_buffers(saved);
  input_ = nullptr;  // the tape no longer belongs to a training step
}

void UNet::fold_norms() {
  if (cfg_.norm.kind == cpu::NormKind::InstanceNorm) {
    folded_ = false;
    return;
  }
  auto fold_stage = [&](Stage& st) {
    for (auto& b : st.blocks) {
      auto f = std::make_unique<ConvLayer>(b.conv.cin(), b.conv.cout(), b.conv.kernel(),
                                           b.conv.stride(), false);
      f->weight.copy_from(b.conv.weight);  // f is on the host here, b.conv on any device
      f->bias.copy_from(b.conv.bias);
      f->use_reference = b.conv.use_reference;
      fold_norm_into_conv(b.norm, f->weight, f->bias);
      f->to(device_);
      b.folded = std::move(f);
    }
  };
  for (auto& st : enc_) fold_stage(st);
  for (auto& st : dec_) fold_stage(st);
  folded_ = true;
}

std::vector<NamedTensor> UNet::parameters() {
  std::vector<NamedTensor> out;
  auto add_stage = [&](const std::string& prefix, Stage& st) {
    for (size_t j = 0; j < st.blocks.size(); ++j) {
      auto& b = st.blocks[j];
      const std::string c = prefix + ".conv." + std::to_string(j);
      const std::string n = prefix + ".norm." + std::to_string(j);
      out.push_back({c + ".weight", &b.conv.weight, &b.conv.dweight, true});
      out.push_back({c + ".bias", &b.conv.bias, &b.conv.dbias, false});
      out.push_back({n + ".gamma", &b.norm.gamma, &b.norm.dgamma, false});
      out.push_back({n + ".beta", &b.norm.beta, &b.norm.dbeta, false});
    }
  };
  for (size_t l = 0; l < enc_.size(); ++l) add_stage("enc." + std::to_string(l), enc_[l]);
  for (size_t l = 0; l < dec_.size(); ++l) {
    const std::string p = "dec." + std::to_string(l);
    out.push_back({p + ".up.weight", &up_[l].weight, &up_[l].dweight, true});
    out.push_back({p + ".up.bias", &up_[l].bias, &up_[l].dbias, false});
    add_stage(p, dec_[l]);
  }
  out.push_back({"head.weight", &head_.weight, &head_.dweight, true});
  out.push_back({"head.bias", &head_.bias, &head_.dbias, false});
  for (size_t i = 0; i < aux_heads_.size(); ++i) {
    const std::string p = "ds." + std::to_string(aux_levels_[i]);
    out.push_back({p + ".weight", &aux_heads_[i].weight, &aux_heads_[i].dweight, true});
    out.push_back({p + ".bias", &aux_heads_[i].bias, &aux_heads_[i].dbias, false});
  }
  return out;
}

std::vector<NamedTensor> UNet::buffers() {
  std::vector<NamedTensor> out;
  auto add_stage = [&](const std::string& prefix, Stage& st) {
    for (size_t j = 0; j < st.blocks.size(); ++j) {
      const std::string n = prefix + ".norm." + std::to_string(j);
      out.push_back({n + ".running_mean", &st.blocks[j].norm.running_mean, nullptr, false});
      out.push_back({n + ".running_std", &st.blocks[j].norm.running_std, nullptr, false});
    }
  };
  for (size_t l = 0; l < enc_.size(); ++l) add_stage("enc." + std::to_string(l), enc_[l]);
  for (size_t l = 0; l < dec_.size(); ++l) add_stage("dec." + std::to_string(l), dec_[l]);
  return out;
}

std::vector<std::vector<float>> UNet::snapshot_buffers() {
  std::vector<std::vector<float>> out;
  for (auto& b : buffers()) out.push_back(b.value->to_vector());
  return out;
}

void UNet::restore_buffers(const std::vector<std::vector<float>>& saved) {
  auto bufs = buffers();
  MEDSEG_CHECK(saved.size() == bufs.size(), "restore_buffers: ", saved.size(), " saved, ", bufs.size(),
               " buffers");
  for (size_t k = 0; k < bufs.size(); ++k) {
    MEDSEG_CHECK(static_cast<int64_t>(saved[k].size()) == bufs[k].value->numel(), "restore_buffers: ",
                 bufs[k].name, " size differs");
    bufs[k].value->assign_from(saved[k].data());
  }
}

int64_t UNet::parameter_count() {
  int64_t n = 0;
  for (auto& p : parameters()) n += p.value->numel();
  return n;
}

void UNet::set_renorm_clips(float r_max, float d_max) {
  for (auto* stages : {&enc_, &dec_})
    for (auto& st : *stages)
      for (auto& b : st.blocks) b.norm.set_clips(r_max, d_max);
}

NormDiagnostics UNet::diagnostics() const {
  NormDiagnostics out;
  int n = 0;
  for (const auto* stages : {&enc_, &dec_})
    for (const auto& st : *stages)
      for (const auto& b : st.blocks) {
        const auto d = b.norm.diagnostics();
        out.r_clipped_fraction += d.r_clipped_fraction;
        out.d_clipped_fraction += d.d_clipped_fraction;
        out.mean_abs_log_r += d.mean_abs_log_r;
        out.mean_abs_d += d.mean_abs_d;
        out.skipped_updates += d.skipped_updates;
        ++n;
      }
  if (n > 0) {
    out.r_clipped_fraction /= n;
    out.d_clipped_fraction /= n;
    out.mean_abs_log_r /= n;
    out.mean_abs_d /= n;
  }
  return out;
}

void UNet::set_use_reference(bool on) {
  for (auto* stages : {&enc_, &dec_})
    for (auto& st : *stages)
      for (auto& b : st.blocks) {
        b.conv.use_reference = on;
        b.norm.use_reference = on;
      }
  for (auto& u : up_) u.use_reference = on;
  for (auto& h : aux_heads_) h.use_reference = on;
  head_.use_reference = on;
}

size_t UNet::activation_bytes() const {
  size_t total = 0;
  auto add = [&](const Tensor& t) { total += t.defined() ? t.bytes() : 0; };
  for (const auto* stages : {&enc_, &dec_})
    for (const auto& st : *stages)
      for (const auto& b : st.blocks) {
        add(b.z);
        add(b.y);
      }
  for (const auto* v : {&cat_, &dcat_, &dskip_})
    for (const auto& t : *v) add(t);
  for (const auto& [shape, pool] : grad_pool_)
    for (const auto& t : pool) add(t);
  add(logits_);
  for (const auto& t : aux_logits_) add(t);
  return total;
}

}  // namespace medseg::nn
