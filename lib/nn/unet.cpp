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
      b.z = b.y = nullptr;
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
  dskip_.clear();
  pool_.set_device(device);
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
              NormLayer(cout, cfg_.norm), nullptr, nullptr, nullptr};
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
  // Another shape: the buffers of the old one would only take memory.
  pool_.clear();
  in_shape_ = in;
  const int L = cfg_.levels;
  const size_t ups = L > 1 ? L - 1 : 0;
  cat_.assign(ups, nullptr);
  dskip_.assign(ups, nullptr);
  Shape ls = in;
  ls.c = cfg_.num_classes;
  ensure(logits_, ls);
  aux_logits_.resize(aux_levels_.size());
  for (size_t i = 0; i < aux_levels_.size(); ++i) {
    Shape as = out_shape(dec_[aux_levels_[i]]);
    as.c = cfg_.num_classes;
    ensure(aux_logits_[i], as);
  }
}

Shape UNet::out_shape(const Stage& st) const {
  // Stage outputs of level l: the input's spatial size / 2^l, filters(l) channels.
  for (int l = 0; l < cfg_.levels; ++l)
    if (&st == &enc_[l] || (l + 1 < cfg_.levels && &st == &dec_[l]))
      return Shape{in_shape_.n, in_shape_.d >> l, in_shape_.h >> l, in_shape_.w >> l,
                   cfg_.filters(l)};
  MEDSEG_CHECK(false, "UNet::out_shape: not a stage of this network");
  return {};
}

void UNet::release(Tensor*& t) {
  if (t) pool_.release(*t);
  t = nullptr;
}

Tensor& UNet::output_of(Block& b) {
  if (b.y) return *b.y;
  MEDSEG_CHECK(b.z != nullptr, "UNet: a block's output is needed after its conv output was freed");
  b.y = &pool_.acquire(b.z->shape());
  b.norm.recompute(*b.z, *b.y);
  return *b.y;
}

void UNet::stage_forward(Stage& st, const Tensor& x, bool train, bool release_x) {
  const Tensor* in = &x;
  const bool keep = keep_outputs(train);
  // After a block's conv has run, its input has had its last reader in this forward (unless kept):
  // freeing it before the norm's output is taken lets that output reuse the buffer.
  auto done_with_input = [&](size_t j) {
    if (j > 0) {
      if (!keep) release(st.blocks[j - 1].y);
    } else if (release_x) {
      pool_.release(x);
    }
  };
  for (size_t j = 0; j < st.blocks.size(); ++j) {
    Block& b = st.blocks[j];
    const Shape s = b.conv.out_shape(in->shape());
    if (!train && folded_ && b.folded) {
      b.y = &pool_.acquire(s);
      b.folded->forward_leaky(*in, *b.y, cfg_.norm.slope);  // one pass; z is not needed
      done_with_input(j);
    } else {
      b.z = &pool_.acquire(s);
      b.conv.forward(*in, *b.z);
      done_with_input(j);
      b.y = &pool_.acquire(s);
      if (train) {
        b.norm.forward_train(*b.z, *b.y);
      } else {
        b.norm.forward_infer(*b.z, *b.y);
        release(b.z);  // inference keeps nothing for a backward
      }
    }
    in = b.y;
  }
}

Tensor* UNet::stage_backward(Stage& st, const Tensor& input, bool release_input, Tensor* g,
                             bool need_dx) {
  for (int j = static_cast<int>(st.blocks.size()) - 1; j >= 0; --j) {
    Block& b = st.blocks[j];
    // dz overwrites dy; the mask comes from z, so y is not read.
    b.norm.backward(*g, *b.z, nullptr, *g);
    release(b.z);
    release(b.y);  // a kept output: its last reader (the next block's conv) is done
    Tensor* in_held = j > 0 ? &output_of(st.blocks[j - 1]) : nullptr;
    const Tensor& in = in_held ? *in_held : input;
    b.conv.backward_weights(*g, in);
    // The input is not read again: its buffer may serve as the input gradient.
    const Shape in_shape = in.shape();
    if (j > 0)
      release(st.blocks[j - 1].y);
    else if (release_input)
      pool_.release(input);
    if (j == 0 && !need_dx) {
      pool_.release(*g);
      return nullptr;
    }
    Tensor& din = pool_.acquire(in_shape);
    b.conv.backward_data(*g, din);
    pool_.release(*g);
    g = &din;
  }
  return g;
}

void UNet::run_forward(const Tensor& x, bool train, bool aux, Tensor& logits) {
  // A new forward abandons the previous one's tape.
  pool_.release_all();
  for (auto* stages : {&enc_, &dec_})
    for (auto& st : *stages)
      for (auto& b : st.blocks) b.z = b.y = nullptr;
  std::fill(cat_.begin(), cat_.end(), nullptr);
  std::fill(dskip_.begin(), dskip_.end(), nullptr);
  input_ = nullptr;

  const int L = cfg_.levels;
  const bool keep = keep_outputs(train);
  const Tensor* in = &x;
  for (int l = 0; l < L; ++l) {
    // The skip (the previous stage's output) stays held until its concatenation.
    stage_forward(enc_[l], *in, train, false);
    in = enc_[l].blocks.back().y;
  }
  for (int l = L - 2; l >= 0; --l) {
    Block& below = (l + 2 < L ? dec_[l + 1] : enc_[L - 1]).blocks.back();
    Block& skip = enc_[l].blocks.back();
    Tensor& up = pool_.acquire(skip.y->shape());
    up_[l].forward(*in, up);
    if (!keep) release(below.y);  // rebuilt for the up-conv's weight gradient
    Shape cs = skip.y->shape();
    cs.c *= 2;
    cat_[l] = &pool_.acquire(cs);
    concat_channels(up, *skip.y, *cat_[l]);
    pool_.release(up);
    if (!keep) release(skip.y);  // the concatenation holds a copy
    // Training keeps the concatenation for the first conv's weight gradient.
    stage_forward(dec_[l], *cat_[l], train, !train);
    if (!train) cat_[l] = nullptr;
    in = dec_[l].blocks.back().y;
    if (aux)
      for (size_t i = 0; i < aux_heads_.size(); ++i)
        if (aux_levels_[i] == l) aux_heads_[i].forward(*in, aux_logits_[i]);
  }
  head_.forward(*in, logits);
  if (!keep) release((L > 1 ? dec_[0] : enc_[0]).blocks.back().y);
}

const Tensor& UNet::forward_train(const Tensor& x) {
  folded_ = false;  // the weights are about to change; fold_norms() must run again
  const Tensor& xd = on_device(x);
  allocate(xd.shape());
  run_forward(xd, true, true, logits_);
  input_ = &xd;
  return logits_;
}

void UNet::backward(const Tensor& dlogits, const std::vector<Tensor>* aux_dlogits) {
  check_same_shape(dlogits.shape(), logits_.shape(), "logits gradient");
  MEDSEG_CHECK(input_ != nullptr, "UNet::backward without a training forward");
  const auto& sup = aux_levels_;
  MEDSEG_CHECK(sup.empty() || (aux_dlogits && aux_dlogits->size() == sup.size()),
               "UNet::backward: deep supervision needs ", sup.size(), " auxiliary logit gradients");
  for (size_t i = 0; i < sup.size(); ++i)
    check_same_shape((*aux_dlogits)[i].shape(), aux_logits_[i].shape(), "auxiliary logits gradient");
  const int L = cfg_.levels;
  // g: the gradient w.r.t. the output of the stage about to be back-propagated (a pool buffer).
  Block& top = (L > 1 ? dec_[0] : enc_[0]).blocks.back();
  // The head's input is not read again once its weight gradient exists (the norm below takes
  // its mask from z), so the input gradient may take its buffer.
  head_.backward_weights(dlogits, output_of(top));
  const Shape top_shape = top.y->shape();
  release(top.y);
  Tensor* g = &pool_.acquire(top_shape);
  head_.backward_data(dlogits, *g);
  for (int l = 0; l + 1 < L; ++l) {
    Block& last = dec_[l].blocks.back();
    // An auxiliary head on this decoder output: its gradient adds to the one from above.
    for (size_t i = 0; i < sup.size(); ++i) {
      if (sup[i] != l) continue;
      Tensor& y = output_of(last);
      Tensor& da = pool_.acquire(y.shape());
      aux_heads_[i].backward((*aux_dlogits)[i], y, &da);
      add_inplace(*g, da);
      pool_.release(da);
    }
    Tensor* dcat = stage_backward(dec_[l], *cat_[l], true, g, true);
    cat_[l] = nullptr;
    const Shape skip_shape = out_shape(enc_[l]);
    MEDSEG_CHECK(dcat->shape().c == 2 * skip_shape.c, "concat of level ", l, " has ",
                 dcat->shape().c, " channels, expected ", 2 * skip_shape.c);
    Tensor& dup = pool_.acquire(skip_shape);
    dskip_[l] = &pool_.acquire(skip_shape);
    split_channels(*dcat, dup, *dskip_[l]);
    pool_.release(*dcat);
    // The up-conv's input: the next decoder stage's output, or the bottleneck's.
    Block& below = (l + 2 < L ? dec_[l + 1] : enc_[L - 1]).blocks.back();
    up_[l].backward_weights(dup, output_of(below));
    const Shape below_shape = below.y->shape();
    release(below.y);  // as for the head: rebuilt if an auxiliary head still needs it
    g = &pool_.acquire(below_shape);
    up_[l].backward_data(dup, *g);
    pool_.release(dup);
  }
  for (int l = L - 1; l >= 0; --l) {
    if (l < L - 1) {  // skip connection: gradients of both uses add
      add_inplace(*g, *dskip_[l]);
      release(dskip_[l]);
    }
    if (l == 0) {
      stage_backward(enc_[0], *input_, false, g, false);
    } else {
      Tensor& prev = output_of(enc_[l - 1].blocks.back());
      g = stage_backward(enc_[l], prev, true, g, true);
      enc_[l - 1].blocks.back().y = nullptr;  // released by stage_backward
    }
  }
  input_ = nullptr;  // the tape is consumed
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
  forward_to(x, true, logits);  // run_forward leaves no training tape (input_ stays null)
  restore_buffers(saved);
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
  size_t total = pool_.bytes() + (logits_.defined() ? logits_.bytes() : 0);
  for (const auto& t : aux_logits_) total += t.defined() ? t.bytes() : 0;
  return total;
}

size_t UNet::peak_activation_bytes() const {
  size_t total = pool_.peak_bytes_in_use() + (logits_.defined() ? logits_.bytes() : 0);
  for (const auto& t : aux_logits_) total += t.defined() ? t.bytes() : 0;
  return total;
}

}  // namespace medseg::nn
