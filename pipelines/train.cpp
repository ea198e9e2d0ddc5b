// The training pipeline: dataset -> validation -> plan -> preprocessing cache -> U-Net training with
// Batch Renormalization -> model bundle. Stages talk through files in the output folder.
#include "pipelines/train.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <memory>
#include <numeric>
#include <optional>
#include <thread>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "core/log.hpp"
#include "core/rng.hpp"
#include "core/threads.hpp"
#include "data/cache.hpp"
#include "data/loader.hpp"
#include "data/plan.hpp"
#include "infer/sliding_window.hpp"
#include "io/dataset.hpp"
#include "kernels/cpu/conv.hpp"
#include "kernels/cpu/ops.hpp"
#include "nn/deep_supervision.hpp"
#include "nn/device_ops.hpp"
#include "nn/model_bundle.hpp"
#include "nn/safetensors.hpp"
#include "pipelines/data_parallel.hpp"
#include "pipelines/device.hpp"
#include "pipelines/progress.hpp"
#include "pipelines/train_log.hpp"

namespace medseg::pipelines {

namespace {
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

struct Split {
  std::vector<io::CaseEntry> train, val;
};

Split split_cases(const std::vector<io::CaseEntry>& cases, const TrainConfig& cfg) {
  std::vector<size_t> order(cases.size());
  std::iota(order.begin(), order.end(), 0);
  Rng rng(cfg.seed ^ 0x5eedf01dULL);
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
  Split s;
  if (cfg.fold >= 0) {
    if (cfg.folds < 2 || cfg.fold >= cfg.folds)
      throw ArgumentError("--fold " + std::to_string(cfg.fold) + " needs 0 <= fold < --folds (" +
                          std::to_string(cfg.folds) + ")");
    for (size_t i = 0; i < order.size(); ++i)
      (static_cast<int>(i % cfg.folds) == cfg.fold ? s.val : s.train).push_back(cases[order[i]]);
  } else {
    if (cfg.val_fraction < 0 || cfg.val_fraction >= 1)
      throw ArgumentError("--val-fraction must be in [0, 1), got " + std::to_string(cfg.val_fraction));
    size_t nval = static_cast<size_t>(std::llround(cfg.val_fraction * static_cast<double>(cases.size())));
    if (cfg.val_fraction > 0 && nval == 0 && cases.size() >= 2) nval = 1;
    for (size_t i = 0; i < order.size(); ++i) (i < nval ? s.val : s.train).push_back(cases[order[i]]);
  }
  if (s.train.empty()) throw ArgumentError("no training cases left after the validation split");
  return s;
}

// The state that exact resume needs besides the tensors.
struct TrainState {
  int64_t step = 0;
  int64_t planned_steps = 0;
  int64_t epoch_length = 0;
  double elapsed_s = 0;  // training wall time before this process
  double best_dice = -1;
  int64_t best_step = -1;
  int64_t skipped_steps = 0;
  int64_t consecutive_bad = 0;
  json to_json() const {
    return {{"step", step},           {"planned_steps", planned_steps}, {"epoch_length", epoch_length},
            {"elapsed_s", elapsed_s}, {"best_dice", best_dice},         {"best_step", best_step},
            {"skipped_steps", skipped_steps}};
  }
  static TrainState from_json(const json& j) {
    TrainState s;
    s.step = j.at("step");
    s.planned_steps = j.at("planned_steps");
    s.epoch_length = j.at("epoch_length");
    s.elapsed_s = j.at("elapsed_s");
    s.best_dice = j.at("best_dice");
    s.best_step = j.at("best_step");
    s.skipped_steps = j.at("skipped_steps");
    return s;
  }
};

// MemAvailable from /proc/meminfo in GB (1e9 bytes), 0 when unknown.
double available_memory_gb() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  double kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024.0 / 1e9;
  return 0;
}

nn::RenormSchedule schedule_from(const TrainConfig& cfg) {
  nn::RenormSchedule s;
  s.warmup_fraction = cfg.renorm_warmup;
  s.r_ramp_end_fraction = cfg.renorm_r_end;
  s.d_ramp_end_fraction = cfg.renorm_d_end;
  s.r_max_final = cfg.r_max;
  s.d_max_final = cfg.d_max;
  s.warmup_steps = cfg.renorm_warmup_steps;
  s.r_ramp_end_step = cfg.renorm_r_end_step;
  s.d_ramp_end_step = cfg.renorm_d_end_step;
  return s;
}

// Batch renorm may only lean on the running statistics once they have converged: the warm-up (plain
// batch norm, r = 1, d = 0) lasts at least three time constants of the moving average (3 / alpha steps,
// 95% converged), capped at half of the planned steps; the ramps keep their lengths after it. Without
// this, a short run relaxes the clips while the running statistics are still far from the batch
// statistics, r and d sit at their clips, and training neither normalises like batch norm nor matches
// inference (measured on sample_data, 6-7.5 min runs: final validation Dice organ/lesion 0.85/0.15 with
// the plain 5% warm-up, 0.88/0.94 with this floor).
nn::RenormSchedule effective_schedule(const nn::RenormSchedule& base, int64_t planned, float alpha) {
  if (base.warmup_steps >= 0 || planned <= 0 || alpha <= 0) return base;
  const int64_t floor_steps =
      std::min<int64_t>(static_cast<int64_t>(std::ceil(3.0 / alpha)), planned / 2);
  const int64_t w = std::llround(base.warmup_fraction * static_cast<double>(planned));
  if (w >= floor_steps) return base;
  nn::RenormSchedule s = base;
  const int64_t shift = floor_steps - w;
  s.warmup_steps = floor_steps;
  if (s.r_ramp_end_step < 0)
    s.r_ramp_end_step = std::min<int64_t>(
        planned, std::llround(base.r_ramp_end_fraction * static_cast<double>(planned)) + shift);
  if (s.d_ramp_end_step < 0)
    s.d_ramp_end_step = std::min<int64_t>(
        planned, std::llround(base.d_ramp_end_fraction * static_cast<double>(planned)) + shift);
  return s;
}

// About ten validation passes per run (nnU-Net validates every 250 steps of a 250k-step run; ours are
// short, and a pass over whole validation cases costs as much as dozens of training steps).
int64_t default_epoch_length(int64_t planned) { return std::clamp<int64_t>(planned / 10, 25, 1000); }

nn::UNetConfig network_from(const data::Plan& plan, const TrainConfig& cfg) {
  nn::UNetConfig u;
  u.in_channels = plan.in_channels;
  u.num_classes = plan.num_classes();
  u.levels = plan.levels;
  u.base_filters = plan.base_filters;
  u.max_filters = plan.max_filters;
  u.norm.kind = nn::parse_norm_kind(cfg.norm);
  u.norm.alpha = cfg.norm_momentum;
  u.deep_supervision = cfg.deep_supervision;
  return u;
}

// Per-label hard Dice on the preprocessed grid of each validation case (inference mode, sliding window
// without TTA; with batch_stats, training mode: each window batch normalized by its own statistics),
// averaged over the cases. Labels 1..K-1; a label absent from both prediction and reference counts
// as 1. With several ranks, rank r scores cases r, r+P, ... and the sums are combined.
std::vector<double> validate(nn::UNet& net, const std::vector<data::CachedCase>& cases,
                             const data::Plan& plan, int batch, const dist::Comm& comm,
                             bool batch_stats = false) {
  const int K = plan.num_classes();
  std::vector<double> inter(K, 0), psum(K, 0), rsum(K, 0), dice_sum(K, 0);
  infer::SlidingWindowOptions opt;
  opt.patch = plan.patch;
  opt.step = 0.5;
  opt.tta = false;
  opt.max_batch = batch;
  auto forward = [&](const Tensor& x, Tensor& logits) {
    if (batch_stats)
      net.forward_batch_stats(x, logits);
    else
      net.forward_infer(x, logits);
  };
  for (size_t ci = static_cast<size_t>(comm.rank()); ci < cases.size(); ci += static_cast<size_t>(comm.size())) {
    const auto v = cases[ci].view();
    const auto probs = infer::sliding_window_probabilities(v.image, v.shape, v.channels, K, forward, opt);
    std::vector<int64_t> i(K, 0), p(K, 0), r(K, 0);
    const int64_t n = v.voxels();
    for (int64_t q = 0; q < n; ++q) {
      const float* pr = probs.data() + q * K;
      const int arg = static_cast<int>(std::max_element(pr, pr + K) - pr);
      const int ref = v.labels[q];
      p[arg]++;
      r[ref]++;
      if (arg == ref) i[arg]++;
    }
    for (int k = 1; k < K; ++k)
      dice_sum[k] += (p[k] + r[k] == 0) ? 1.0 : 2.0 * static_cast<double>(i[k]) / static_cast<double>(p[k] + r[k]);
  }
  comm.allreduce_sum(dice_sum.data(), dice_sum.size());
  std::vector<double> dice(K, 0);
  for (int k = 1; k < K; ++k) dice[k] = cases.empty() ? 0 : dice_sum[k] / static_cast<double>(cases.size());
  return dice;
}

// Fills {label name: Dice} for labels 1..K-1 into out and returns their mean.
double per_label_json(const data::Plan& plan, const std::vector<double>& dice, json& out) {
  double mean = 0;
  for (int k = 1; k < plan.num_classes(); ++k) {
    out[plan.labels[k].name] = dice[k];
    mean += dice[k] / (plan.num_classes() - 1);
  }
  return mean;
}

std::string versions_string() {
  return std::string("medseg ") + MEDSEG_VERSION + "; oneDNN " + cpu::onednn_version();
}

int train_into(const TrainConfig& cfg);

}  // namespace

// A run that fails before its first checkpoint leaves no model folder behind when it made that
// folder (the preprocessing cache and plan of a failed run are partial output); a folder that
// existed before, or holds a checkpoint, is kept.
int run_train(const TrainConfig& cfg) {
  std::error_code ec;
  const bool existed = fs::exists(cfg.out, ec);
  try {
    const int code = train_into(cfg);
    // A dry run trains nothing: the folder it made for the model stays only if something is in it.
    if (cfg.dry_run && !existed && fs::is_directory(cfg.out, ec) && fs::is_empty(cfg.out, ec))
      fs::remove(cfg.out, ec);
    return code;
  } catch (...) {
    if (!existed && fs::is_directory(cfg.out, ec) &&
        nn::find_directory(cfg.out, "checkpoint_last").empty() &&
        nn::find_directory(cfg.out, "checkpoint_best").empty() &&
        !fs::exists(cfg.out / "model.safetensors", ec))
      fs::remove_all(cfg.out, ec);
    throw;
  }
}

namespace {
int train_into(const TrainConfig& cfg) {
  const auto t_start = Clock::now();
  // The process group: one process, or the ranks of `mpirun -np P medseg train ...` (data parallel).
  dist::Comm& comm = dist::Comm::world();
  const bool root = comm.root();
  const bool parallel = comm.size() > 1;
  if (parallel && !root) {
    // Rank 0 reports; the others only warn and fail, and say who they are.
    set_log_prefix("rank " + std::to_string(comm.rank()) + ": ");
    if (log_level() < LogLevel::Warn) set_log_level(LogLevel::Warn);
  }
  int threads = cfg.threads;
  if (threads <= 0 && comm.local_size() > 1)  // the processes of one machine share its cores
    threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / comm.local_size());
  set_num_threads(threads);
  const DeviceChoice device = resolve_device(cfg.device, true, comm.local_rank());
  log_info(device.description);
  if (parallel)
    log_info("data-parallel training on ", comm.size(), " processes (", dist::mpi_version(), "), ",
             num_threads(), " thread(s) each; gradients averaged every step");

  // ---- options, dataset and validation: every rank checks its own inputs; a failure on any rank
  // stops all of them with that rank's message.
  io::Dataset ds;
  collectively(comm, [&] {
    if (cfg.out.empty()) throw ArgumentError("--out is required");
    if (cfg.batch_size < 0) throw ArgumentError("--batch-size must be >= 1");
    if (cfg.iterations < 0) throw ArgumentError("--iterations must be >= 0");
    (void)data::AugmentConfig::preset(cfg.augment);  // an unknown name fails before any work
    if (!(cfg.norm_momentum > 0 && cfg.norm_momentum <= 1))
      throw ArgumentError("--norm-momentum must be in (0, 1]");
    if (cfg.time_limit_minutes < 0 || !std::isfinite(cfg.time_limit_minutes))
      throw ArgumentError("--time-limit must be a positive number of minutes");
    // The ranges the layers and the optimizer assume, as option errors (they were internal
    // checks naming source files, or were not checked at all).
    if (!(cfg.lr > 0 && cfg.lr <= 10)) throw ArgumentError("--lr must be in (0, 10]");
    if (cfg.base_filters < 1 || cfg.base_filters > 4096)
      throw ArgumentError("--base-filters must be 1 to 4096");
    if (cfg.max_filters < cfg.base_filters || cfg.max_filters > 65536)
      throw ArgumentError("--max-filters must be at least --base-filters (" +
                          std::to_string(cfg.base_filters) + ") and at most 65536");
    if (cfg.optimizer != "sgd" && cfg.optimizer != "adamw")
      throw ArgumentError("--optimizer must be sgd or adamw, got '" + cfg.optimizer + "'");
    if (!(cfg.r_max >= 1 && cfg.r_max <= 1e6) || !(cfg.d_max >= 0 && cfg.d_max <= 1e6))
      throw ArgumentError("--r-max must be >= 1 and --d-max >= 0");
    for (const double f : {cfg.renorm_warmup, cfg.renorm_r_end, cfg.renorm_d_end})
      if (!(f >= 0 && f <= 1))
        throw ArgumentError("--renorm-warmup, --renorm-r-end and --renorm-d-end are fractions of the "
                            "run, 0 to 1");
    if (cfg.workers < 1 || cfg.workers > 64) throw ArgumentError("--workers must be 1 to 64");
    if (cfg.fold < -1 || (cfg.fold >= 0 && cfg.folds < 2))
      throw ArgumentError("--fold must be 0 .. --folds - 1 with --folds >= 2");
    if (!(cfg.val_fraction >= 0 && cfg.val_fraction < 1) && cfg.fold < 0)
      throw ArgumentError("--val-fraction must be in [0, 1)");

    ds = io::discover_dataset(cfg.data);
    log_info("dataset: ", ds.name.empty() ? cfg.data.string() : ds.name, " (", ds.layout, " layout, ",
             ds.training.size(), " labelled cases, ", ds.num_channels(), " channel(s))");
    io::ValidationOptions vopt;
    auto report = io::validate_dataset(ds, vopt);
    if (!report.problems.empty()) {
      if (root)
        std::cerr << report.text();
      else if (!report.ok() && !cfg.exclude_bad_cases)  // rank 0 does not see this rank's problems
        log_warn("dataset problems on this rank:\n", report.text());
    }
    io::drop_or_refuse_bad_cases(ds, report, cfg.exclude_bad_cases, cfg.data);
    if (ds.training.size() < 1) throw ArgumentError("no usable training cases in " + cfg.data.string());
    // The model folder must not be the dataset, nor sit among its scans (its files would be read
    // as cases by the next run), nor be a file.
    {
      std::error_code ec;
      if (fs::exists(cfg.out, ec) && !fs::is_directory(cfg.out, ec))
        throw ArgumentError("--out " + cfg.out.string() + " exists and is not a folder");
      const fs::path out = fs::weakly_canonical(fs::absolute(cfg.out));
      if (out == fs::weakly_canonical(fs::absolute(cfg.data)))
        throw ArgumentError("--out " + cfg.out.string() + " is the dataset folder; put the model elsewhere");
      std::set<fs::path> scan_dirs;
      for (const auto& c : ds.training) {
        for (const auto& i : c.images) scan_dirs.insert(fs::weakly_canonical(i).parent_path());
        if (!c.label.empty()) scan_dirs.insert(fs::weakly_canonical(c.label).parent_path());
      }
      for (fs::path p = out;; p = p.parent_path()) {
        if (scan_dirs.count(p))
          throw ArgumentError("--out " + cfg.out.string() + " is inside the dataset's scan folder " +
                              p.string() + "; put the model elsewhere");
        if (p.empty() || p == p.parent_path()) break;
      }
    }
  });
  if (parallel) {
    uint64_t h = fnv1a(nullptr, 0);
    for (const auto& c : ds.training) h = fnv1a((c.id + "/").data(), c.id.size() + 1, h);
    if (!comm.same_everywhere(h))
      throw dist::GroupError("the ranks see different training cases in " + cfg.data.string() +
                             " (rank 0 has " + std::to_string(ds.training.size()) +
                             "); every rank must read the same dataset", 2);
  }

  // ---- plan: made (or, on --resume, read) by rank 0 and sent to the others
  const fs::path plan_path = cfg.out / "plan.json";
  fs::path last_dir;
  bool resuming = false;
  data::Plan plan;
  nn::UNetConfig ucfg;
  json bundle;
  collectively(comm, [&] {
    if (!root) return;
    std::filesystem::create_directories(cfg.out);
    last_dir = nn::find_directory(cfg.out, "checkpoint_last");
    resuming = cfg.resume && !last_dir.empty();
    if (cfg.resume && !resuming) log_warn("--resume: no checkpoint in ", cfg.out, ", starting fresh");
    if (resuming) {
      try {
        bundle = json::parse(read_file(plan_path));
        plan = data::Plan::from_json(bundle.at("plan"));
        ucfg = nn::unet_config_from_json(bundle.at("network"));
      } catch (const json::exception& e) {
        throw IoError(plan_path.string() + ": malformed: " + e.what());
      }
      // The checkpoint continues only the run it came from: the same dataset (name, channels,
      // labels) it was planned on.
      std::string why;
      if (plan.dataset_name != ds.name)
        why = "dataset '" + plan.dataset_name + "', --data is '" + ds.name + "'";
      else if (plan.in_channels != ds.num_channels())
        why = std::to_string(plan.in_channels) + " channel(s), --data has " +
              std::to_string(ds.num_channels());
      else if (plan.labels.size() != ds.labels.size())
        why = std::to_string(plan.labels.size()) + " labels, --data has " +
              std::to_string(ds.labels.size());
      else
        for (size_t k = 0; k < plan.labels.size() && why.empty(); ++k)
          if (plan.labels[k].value != ds.labels[k].value || plan.labels[k].name != ds.labels[k].name)
            why = "label " + std::to_string(plan.labels[k].value) + " '" + plan.labels[k].name +
                  "', --data has " + std::to_string(ds.labels[k].value) + " '" + ds.labels[k].name + "'";
      if (!why.empty())
        throw ArgumentError("--resume: the checkpoint in " + cfg.out.string() + " was planned on " +
                            why + "; resume with the same dataset or train into a new --out");
      const std::string kind = bundle.contains("optimizer") && bundle["optimizer"].is_object()
                                   ? bundle["optimizer"].value("kind", std::string("sgd"))
                                   : std::string("sgd");
      if (kind != cfg.optimizer)
        throw ArgumentError("--resume: the checkpoint in " + cfg.out.string() + " was trained with --optimizer " +
                            kind + ", not " + cfg.optimizer);
      if (cfg.iterations > 0)
        log_warn("--resume continues the checkpoint's own schedule; --iterations ", cfg.iterations,
                 " is ignored (train into a new --out for another length)");
    } else {
      data::PlanOptions popt;
      popt.base_filters = cfg.base_filters;
      popt.max_filters = cfg.max_filters;
      if (cfg.batch_size > 0) popt.batch_size = cfg.batch_size;
      popt.patch_override = cfg.patch;
      log_info("fingerprinting ", ds.training.size(), " cases...");
      auto fp = data::fingerprint_dataset(ds);
      plan = data::make_plan(ds, fp, popt);
      ucfg = network_from(plan, cfg);
    }
  });
  if (parallel) {
    std::string text;
    if (root)
      text = json{{"plan", plan.to_json()}, {"network", nn::unet_config_to_json(ucfg)}, {"resuming", resuming}}
                 .dump();
    comm.broadcast(text);
    if (!root) {
      const json j = json::parse(text);
      plan = data::Plan::from_json(j.at("plan"));
      ucfg = nn::unet_config_from_json(j.at("network"));
      resuming = j.at("resuming");
    }
  }
  const int batch = cfg.batch_size > 0 ? cfg.batch_size : plan.batch_size;
  if (root) std::cerr << plan.describe();
  // A patch or batch far beyond the host's memory ends in the OOM killer (no message, the model
  // folder left behind). The planner's estimate is an upper bound (it counts the activations held
  // before session 7; the network now holds about half): refuse when even half of it exceeds the
  // memory available. GPU runs keep their activations on the device.
  if (!device.cuda) {
    const double need_gb = 0.5 * data::estimate_training_memory_gb(plan.patch, plan.levels,
                                                                   plan.base_filters, plan.max_filters,
                                                                   batch, plan.in_channels,
                                                                   plan.num_classes());
    const double have_gb = available_memory_gb();
    if (have_gb > 0 && need_gb > have_gb)
      throw ArgumentError("batch " + std::to_string(batch) + " of patch " + std::to_string(plan.patch[0]) +
                          "x" + std::to_string(plan.patch[1]) + "x" + std::to_string(plan.patch[2]) +
                          " needs about " + std::to_string(static_cast<int>(std::ceil(need_gb))) +
                          " GB for its activations, more than the " +
                          std::to_string(static_cast<int>(have_gb)) +
                          " GB available; use a smaller --patch or --batch-size");
  }
  if (ucfg.deep_supervision && ucfg.supervised_levels().empty())
    log_warn("--deep-supervision: the network has ", ucfg.levels, " levels; auxiliary heads need at "
             "least 4 (the lowest decoder level gets weight 0), so none are added");

  Split split = split_cases(ds.training, cfg);
  if (split.val.empty() && (cfg.fold >= 0 || cfg.val_fraction > 0))
    log_warn("no validation case in this split (", ds.training.size(),
             " cases): no validation Dice, the final weights are the model");
  nn::UNet net(ucfg, cfg.seed);
  place_network(device, net, cfg.tf32);  // the same initial weights on either device
  log_info("network: ", ucfg.levels, " levels, ", ucfg.base_filters, " base filters, ",
           nn::norm_kind_name(ucfg.norm.kind), ", ", net.parameter_count(), " parameters; batch ",
           batch, ", patch ", plan.patch[0], "x", plan.patch[1], "x", plan.patch[2]);
  log_info("split: ", split.train.size(), " training, ", split.val.size(), " validation cases",
           cfg.fold >= 0 ? " (fold " + std::to_string(cfg.fold) + "/" + std::to_string(cfg.folds) + ")" : "");

  if (cfg.dry_run) {
    if (!root) return 0;
    const double gb = data::estimate_training_memory_gb(plan.patch, plan.levels, plan.base_filters,
                                                        plan.max_filters, batch, plan.in_channels,
                                                        plan.num_classes());
    // Time one step on random data for the estimate.
    Tensor x(Shape{batch, plan.patch[0], plan.patch[1], plan.patch[2], plan.in_channels});
    Rng r(1);
    for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = static_cast<float>(r.normal());
    std::vector<uint16_t> labels(x.shape().per_channel(), 0);
    Tensor dl;
    nn::SupervisionBuffers sup;
    double step_s = 0;
    for (int i = 0; i < 3; ++i) {
      auto t = Clock::now();
      const Tensor& lg = net.forward_train(x);
      nn::supervised_loss(net, lg, labels.data(), dl, sup);
      net.backward(dl, &sup.aux_dlogits);
      nn::synchronize_device();
      step_s = seconds_since(t);
    }
    const int64_t steps = cfg.iterations > 0 ? cfg.iterations
                          : cfg.time_limit_minutes > 0
                              ? static_cast<int64_t>(cfg.time_limit_minutes * 60 / step_s)
                              : 10000;
    std::cout << "dry run: " << net.parameter_count() << " parameters; activation memory "
              << std::fixed << std::setprecision(2) << static_cast<double>(net.activation_bytes()) / 1e9
              << " GB measured (" << gb << " GB planned); " << std::setprecision(3) << step_s
              << " s per step here; " << steps << " steps take about "
              << format_duration(static_cast<double>(steps) * step_s) << "\n";
    return 0;
  }

  // ---- preprocessing cache
  const fs::path cache_dir = cfg.out / "preprocessed";
  std::vector<io::CaseEntry> all = split.train;
  all.insert(all.end(), split.val.begin(), split.val.end());
  // Rank 0 writes the cache; then the others open it (or, without a shared file system, write their own).
  Progress prep_progress(10.0);
  std::vector<data::CachedCase> cached;
  for (const bool writer : {true, false})
    collectively(comm, [&] {
      if (root != writer) return;
      cached = data::prepare_cache(plan, ds, all, cache_dir, std::max(1, num_threads()),
                                   [&](const data::CacheProgress& p) {
                                     if (root)
                                       prep_progress.update("preprocessing " + std::to_string(p.done) +
                                                            "/" + std::to_string(p.total) + " " + p.id);
                                   });
    });
  prep_progress.finish();
  std::vector<data::CachedCase> val_cases;
  std::vector<data::CaseView> train_views;
  for (size_t i = 0; i < cached.size(); ++i) {
    if (i < split.train.size())
      train_views.push_back(cached[i].view());
    else if (cfg.max_validation_cases <= 0 || static_cast<int>(val_cases.size()) < cfg.max_validation_cases)
      val_cases.push_back(std::move(cached[i]));
  }
  // train_views point into `cached`, which stays alive (moved-from entries are validation cases only).

  // ---- running statistics across ranks
  // Runs fn with the running statistics averaged over the ranks - the one model that validation
  // scores and checkpoints hold - then gives every rank its own statistics back: training goes on
  // with per-rank statistics (Batch Renormalization's point), and a resumed run continues exactly
  // because the checkpoint also keeps every rank's own (rank_statistics.safetensors).
  auto with_mean_statistics = [&](const std::function<void()>& fn) {
    if (!parallel) return fn();
    const auto own = net.snapshot_buffers();
    average_tensors(comm, net.buffers());
    fn();
    net.restore_buffers(own);
  };
  // Tensors for every rank's running statistics, "rank<r>.<buffer name>", rank after rank; `storage`
  // owns them.
  auto rank_statistics_tensors = [&](std::vector<Tensor>& storage) {
    const auto bufs = net.buffers();
    storage.clear();
    storage.reserve(bufs.size() * static_cast<size_t>(comm.size()));
    std::vector<nn::NamedTensor> named;
    for (int r = 0; r < comm.size(); ++r)
      for (const auto& b : bufs) {
        storage.emplace_back(b.value->shape());
        named.push_back({"rank" + std::to_string(r) + "." + b.name, &storage.back(), nullptr, false});
      }
    return named;
  };

  // ---- optimiser, state, resume
  nn::OptimizerConfig ocfg;
  ocfg.kind = cfg.optimizer;
  ocfg.lr = cfg.lr;
  nn::Optimizer opt(ocfg, net.parameters());
  TrainState st;
  if (resuming) {
    std::string state_text;
    collectively(comm, [&] {
      if (!root) return;
      nn::load_model(last_dir / "model.safetensors", net);
      load_safetensors(last_dir / "optimizer.safetensors", opt.state());
      state_text = read_file(last_dir / "state.json");
    });
    comm.broadcast(state_text);
    broadcast_tensors(comm, opt.state());
    try {
      st = TrainState::from_json(json::parse(state_text));
    } catch (const json::exception& e) {
      throw IoError((last_dir / "state.json").string() + ": malformed: " + e.what());
    }
    if (st.step < 0 || st.planned_steps < 1 || st.step > st.planned_steps || st.epoch_length < 0 ||
        !(st.elapsed_s >= 0) || st.skipped_steps < 0 || st.skipped_steps > st.step)
      throw IoError((last_dir / "state.json").string() + ": inconsistent: step " +
                    std::to_string(st.step) + " of " + std::to_string(st.planned_steps) +
                    " planned steps");
    opt.set_steps(st.step);
    log_info("resuming at step ", st.step, " of ", st.planned_steps, " from ", last_dir);
  }
  // Identical weights (and running statistics) on every rank from the start.
  broadcast_tensors(comm, net.parameters());
  broadcast_tensors(comm, net.buffers());
  if (resuming && parallel) {
    // Each rank continues with its own running statistics, saved at the checkpoint, when the run
    // had as many ranks; otherwise with the averaged ones of the model.
    std::vector<Tensor> all;
    std::vector<nn::NamedTensor> named = rank_statistics_tensors(all);
    double found = 0;
    if (root) {
      try {
        load_safetensors(last_dir / "rank_statistics.safetensors", named);
        found = 1;
      } catch (const Error& e) {
        log_warn("the ranks start from the averaged running statistics (", e.what(), ")");
      }
    }
    comm.broadcast(&found, sizeof found);
    if (found > 0) {
      broadcast_tensors(comm, named);
      auto own = net.buffers();
      for (size_t k = 0; k < own.size(); ++k)
        own[k].value->copy_from(all[static_cast<size_t>(comm.rank()) * own.size() + k]);
    }
  }
  const nn::RenormSchedule schedule = schedule_from(cfg);
  const bool timed = cfg.time_limit_minutes > 0;
  // The time limit covers the whole command: setup (validation, planning, preprocessing) counts too.
  const double limit_s =
      cfg.time_limit_minutes * 60.0 - (resuming ? 0.0 : seconds_since(t_start));
  if (!resuming) {
    st.planned_steps = cfg.iterations > 0 ? cfg.iterations : (timed ? 0 : 10000);
    st.epoch_length = cfg.epoch_length;
  }

  data::SamplerConfig scfg;
  scfg.patch = plan.patch;
  scfg.max_overhang = 0;  // nnU-Net v2: random patches stay inside cases larger than the patch
  const data::AugmentConfig acfg = data::AugmentConfig::preset(cfg.augment);
  // Each rank samples its own patches (its own seed), unless a test asks for the same ones everywhere.
  const uint64_t loader_seed =
      cfg.same_batches_on_all_ranks ? cfg.seed : cfg.seed + 0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(comm.rank());
  data::BatchLoader loader(train_views, scfg, acfg, batch, std::max(1, cfg.workers), loader_seed, 4,
                           static_cast<uint64_t>(st.step));
  std::optional<TrainLog> tlog;  // rank 0 writes the log
  if (root) tlog.emplace(cfg.out, resuming);

  // ---- bundle description (rewritten at every checkpoint with the training summary)
  bundle["format"] = "medseg-model-bundle/1";
  bundle["plan"] = plan.to_json();
  bundle["network"] = nn::unet_config_to_json(ucfg);
  bundle["versions"] = versions_string();
  bundle["optimizer"] = {{"kind", ocfg.kind}, {"lr", ocfg.lr}, {"momentum", ocfg.momentum},
                         {"weight_decay", ocfg.weight_decay}, {"grad_clip", ocfg.grad_clip},
                         {"lr_schedule", "poly 0.9"}};
  bundle["augmentation"] = cfg.augment;
  bundle["renorm_schedule"] = {{"warmup_fraction", schedule.warmup_fraction},
                               {"r_ramp_end_fraction", schedule.r_ramp_end_fraction},
                               {"d_ramp_end_fraction", schedule.d_ramp_end_fraction},
                               {"r_max", schedule.r_max_final}, {"d_max", schedule.d_max_final},
                               {"warmup_floor", "at least 3/alpha steps, at most half the planned steps"}};
  json val_ids = json::array();
  for (auto& c : split.val) val_ids.push_back(c.id);
  bundle["validation_cases"] = val_ids;

  // `elapsed` is the total training wall time so far (earlier processes included).
  // Collective: every rank calls it; rank 0 writes. Also writes checkpoint_best when `best`.
  auto save_checkpoint = [&](bool also_final, double elapsed, bool best = false) {
    // Every rank's own running statistics, for an exact --resume (see rank_statistics_tensors).
    const std::vector<float> per_rank = parallel ? gather_tensors(comm, net.buffers()) : std::vector<float>();
    with_mean_statistics([&] {
      if (!comm.same_everywhere(tensors_checksum(net.parameters())))
        throw dist::GroupError("the weights differ between ranks at step " + std::to_string(st.step) +
                               " (data-parallel training keeps them identical; this is a medseg bug)", 1);
      if (!root) return;
      TrainState saved = st;
      saved.elapsed_s = elapsed;
      bundle["training"] = {{"steps", st.step}, {"planned_steps", st.planned_steps},
                            {"best_mean_dice", st.best_dice}, {"best_step", st.best_step},
                            {"skipped_steps", st.skipped_steps}, {"elapsed_s", elapsed},
                            {"batch_size", batch}, {"seed", cfg.seed}, {"threads", num_threads()},
                            {"processes", comm.size()},
                            {"norm_skipped_updates", net.diagnostics().skipped_updates}};
      const std::map<std::string, std::string> meta{{"format", "medseg"}, {"step", std::to_string(st.step)}};
      nn::write_directory_atomic(cfg.out, "checkpoint_last", [&](const fs::path& d) {
        nn::save_model(d / "model.safetensors", net, meta);
        nn::save_safetensors(d / "optimizer.safetensors", opt.state(), meta);
        write_text_file_atomic(d / "state.json", saved.to_json().dump(2));
        if (parallel) {
          std::vector<Tensor> all;
          const auto named = rank_statistics_tensors(all);
          size_t off = 0;
          for (auto& t : all) {
            std::copy(per_rank.begin() + static_cast<std::ptrdiff_t>(off),
                      per_rank.begin() + static_cast<std::ptrdiff_t>(off + static_cast<size_t>(t.numel())), t.data());
            off += static_cast<size_t>(t.numel());
          }
          nn::save_safetensors(d / "rank_statistics.safetensors", named, meta);
        }
      });
      write_text_file_atomic(plan_path, bundle.dump(2));
      if (also_final) nn::save_model(cfg.out / "model.safetensors", net, meta);
      if (best)
        nn::write_directory_atomic(cfg.out, "checkpoint_best",
                                   [&](const fs::path& d) { nn::save_model(d / "model.safetensors", net, meta); });
    });
  };

  // ---- the loop
  Tensor dlogits;
  nn::SupervisionBuffers supervision;
  Progress progress(30.0);
  std::vector<double> recent_step_s;
  double loss_avg = 0;
  int64_t loss_count = 0;
  const auto t_loop = Clock::now();
  const int64_t first_step = st.step;
  double val_seconds = 0;
  int64_t validations = 0;
  auto elapsed_total = [&] { return st.elapsed_s + seconds_since(t_loop); };
  bool stopped_by_signal = false;
  const std::vector<nn::NamedTensor> params = net.parameters();
  std::vector<float> grad_scratch;
  // One GPU per rank: gradients averaged by NCCL on the device when every rank can load it (the
  // communicator's creation blocks until all ranks join, so they agree first); else through MPI.
  std::unique_ptr<dist::NcclComm> nccl;
  if (parallel && device.cuda) {
    std::string why;
    const auto unavailable = comm.first_failure(dist::nccl_loadable(&why) ? "" : why);
    std::string error;
    if (unavailable.rank < 0) {
      try {
        nccl = std::make_unique<dist::NcclComm>(comm);
      } catch (const Error& e) {
        error = e.what();
      }
    }
    const auto failed = unavailable.rank >= 0 ? unavailable : comm.first_failure(error);
    if (failed.rank >= 0) {
      nccl.reset();
      if (root)
        log_warn("NCCL not usable on rank ", failed.rank, " (", failed.message,
                 "): GPU gradients are averaged through MPI on the host");
    } else if (root) {
      log_info("gradients averaged on the GPUs with NCCL ", dist::nccl_version());
    }
  }

  while (true) {
    if (cfg.stop_after_steps > 0 && st.step - first_step >= cfg.stop_after_steps) break;
    // Re-estimate the plan of a timed run from measured step times.
    if (timed && (st.planned_steps == 0 || (st.step % 20 == 0 && recent_step_s.size() >= 5))) {
      if (recent_step_s.size() >= 3) {
        std::vector<double> sorted = recent_step_s;
        std::sort(sorted.begin(), sorted.end());
        const double step_s = sorted[sorted.size() / 2];
        const double per_val = validations > 0 ? val_seconds / static_cast<double>(validations) : 0;
        const double left = limit_s - elapsed_total();
        // Remaining validations cost time too: one per epoch.
        const double epoch_steps = static_cast<double>(std::max<int64_t>(st.epoch_length, 1));
        const double per_step = step_s + per_val / epoch_steps;
        st.planned_steps = std::max<int64_t>(st.step + 1, st.step + static_cast<int64_t>(left / per_step));
        if (st.epoch_length == 0) st.epoch_length = default_epoch_length(st.planned_steps);
      } else if (st.planned_steps == 0) {
        st.planned_steps = st.step + 1000000;  // provisional until 3 steps are timed
      }
    }
    // A timed run fixes its epoch length with its first estimate of the planned steps (above).
    if (!timed && st.epoch_length == 0) st.epoch_length = default_epoch_length(st.planned_steps);
    // Rank 0's clock decides the schedule and the end of a timed run for every rank (their step
    // times differ a little, and a different planned step count would mean a different learning
    // rate); a signal to any rank stops all of them at the same step.
    double control[4] = {stop_requested() ? 1.0 : 0.0, root ? static_cast<double>(st.planned_steps) : 0.0,
                         root ? static_cast<double>(st.epoch_length) : 0.0,
                         root && timed && elapsed_total() >= limit_s && recent_step_s.size() >= 3 ? 1.0 : 0.0};
    comm.allreduce_sum(control, 4);
    st.planned_steps = static_cast<int64_t>(control[1]);
    st.epoch_length = static_cast<int64_t>(control[2]);
    if (control[0] > 0) {
      stopped_by_signal = true;
      break;
    }
    if (st.step >= st.planned_steps) break;
    if (control[3] > 0) break;

    const auto t_step = Clock::now();
    const auto [r_max, d_max] = effective_schedule(schedule, st.planned_steps, ucfg.norm.alpha)
                                    .clips_at(st.step, st.planned_steps);
    net.set_renorm_clips(r_max, d_max);
    const double lr = nn::poly_lr(ocfg.lr, st.step, st.planned_steps, ocfg.poly_exponent);
    data::Batch b = loader.next();
    // Snapshot the running statistics: a non-finite loss must leave them untouched.
    const auto saved = net.snapshot_buffers();
    const Tensor& logits = net.forward_train(b.image);
    const auto res = nn::supervised_loss(net, logits, b.labels.data(), dlogits, supervision);
    const bool local_bad = !std::isfinite(res.loss);
    if (!local_bad) net.backward(dlogits, &supervision.aux_dlogits);
    // Data parallel: the mean gradient (and loss) over the ranks; a non-finite loss on any rank skips
    // the step on all of them.
    StepScalars sc{local_bad ? 1.0 : 0.0, res.loss, res.ce, res.soft_dice};
    average_gradients(comm, params, sc, grad_scratch, nccl.get());
    double gnorm = 0;
    bool bad = sc.bad > 0;
    if (!bad) {
      gnorm = opt.step(lr);
      bad = !std::isfinite(gnorm);
    }
    if (bad) {
      net.restore_buffers(saved);
      st.skipped_steps++;
      st.consecutive_bad++;
      if (local_bad || root)
        log_warn("step ", st.step, ": non-finite loss or gradient (cases ",
                 b.case_ids.empty() ? "?" : b.case_ids[0], "...", parallel && !local_bad ? " on another rank" : "",
                 "), step skipped");
      if (st.consecutive_bad >= 20) {
        const std::string msg = "training diverged: 20 consecutive steps with a non-finite loss or "
                                "gradient at step " + std::to_string(st.step) + "; lower --lr or check the data";
        if (parallel) throw dist::GroupError(msg, 1);
        throw NumericError(msg);
      }
    } else {
      st.consecutive_bad = 0;
    }
    st.step++;
    const double step_s = seconds_since(t_step);
    recent_step_s.push_back(step_s);
    if (recent_step_s.size() > 50) recent_step_s.erase(recent_step_s.begin());
    if (!bad) {
      loss_avg += sc.loss;
      loss_count++;
    }
    if (root && (st.step % 10 == 0 || st.step == 1)) {
      const auto diag = net.diagnostics();
      tlog->step({{"step", st.step}, {"loss", sc.loss}, {"ce", sc.ce}, {"soft_dice", sc.soft_dice},
                 {"lr", lr}, {"r_max", r_max}, {"d_max", d_max}, {"grad_norm", gnorm},
                 {"step_s", step_s}, {"r_clipped", diag.r_clipped_fraction},
                 {"d_clipped", diag.d_clipped_fraction}, {"mean_abs_log_r", diag.mean_abs_log_r},
                 {"mean_abs_d", diag.mean_abs_d}, {"elapsed_s", elapsed_total()}});
    }
    if (root) {
      std::ostringstream line;
      const double its = 1.0 / std::max(1e-9, step_s);
      const double eta = timed ? limit_s - elapsed_total()
                               : static_cast<double>(st.planned_steps - st.step) * step_s;
      line << "step " << st.step << "/" << st.planned_steps << "  " << std::fixed << std::setprecision(2)
           << its << " it/s  loss " << std::setprecision(4) << sc.loss << "  lr " << std::scientific
           << std::setprecision(2) << lr << std::fixed << "  r_max " << std::setprecision(2) << r_max
           << " d_max " << d_max << "  ETA " << format_duration(eta);
      progress.update(line.str());
    }
    const bool epoch_end = st.epoch_length > 0 && st.step % st.epoch_length == 0;
    double time_up = root && timed && elapsed_total() >= limit_s ? 1.0 : 0.0;
    comm.allreduce_sum(&time_up, 1);  // rank 0's clock decides
    const bool last = st.step >= st.planned_steps || time_up > 0;
    if (epoch_end || last) {
      const auto t_val = Clock::now();
      std::vector<double> dice;
      double mean = 0;
      json jd = json::object();
      if (!val_cases.empty())  // the one model a checkpoint will hold
        with_mean_statistics([&] {
          dice = validate(net, val_cases, plan, batch, comm);
          mean = per_label_json(plan, dice, jd);
        });
      val_seconds += seconds_since(t_val);
      validations++;
      const auto diag = net.diagnostics();
      json record = {{"step", st.step}, {"train_loss", loss_count ? loss_avg / loss_count : NAN},
                  {"val_dice", jd}, {"mean_val_dice", val_cases.empty() ? json(nullptr) : json(mean)},
                  {"lr", lr}, {"r_max", r_max}, {"d_max", d_max},
                  {"r_clipped", diag.r_clipped_fraction}, {"d_clipped", diag.d_clipped_fraction},
                  {"mean_abs_log_r", diag.mean_abs_log_r}, {"mean_abs_d", diag.mean_abs_d},
                  {"skipped_norm_updates", diag.skipped_updates}, {"skipped_steps", st.skipped_steps},
                  {"elapsed_s", elapsed_total()}};
      if (last && cfg.report_batch_stats && !val_cases.empty()) {
        json jb = json::object();
        double bmean = 0;
        with_mean_statistics([&] {
          bmean = per_label_json(plan, validate(net, val_cases, plan, batch, comm, /*batch_stats=*/true), jb);
        });
        record["val_dice_batch_stats"] = jb;
        record["mean_val_dice_batch_stats"] = bmean;
        log_info("validation Dice in training mode (batch statistics): mean ", bmean,
                 " (inference mode ", mean, ")");
      }
      if (root) tlog->epoch(std::move(record));
      progress.finish();
      std::ostringstream msg;
      msg << "step " << st.step << ": train loss " << std::fixed << std::setprecision(4)
          << (loss_count ? loss_avg / loss_count : NAN);
      if (!val_cases.empty()) {
        msg << ", validation Dice";
        for (int k = 1; k < plan.num_classes(); ++k) msg << " " << plan.labels[k].name << " " << dice[k];
        msg << " (mean " << mean << ")";
      }
      log_info(msg.str());
      loss_avg = 0;
      loss_count = 0;
      const bool best = !val_cases.empty() && mean > st.best_dice;
      if (best) {
        st.best_dice = mean;
        st.best_step = st.step;
      }
      save_checkpoint(last, elapsed_total(), best);
      if (root) tlog->write_curves();
      if (last) break;
    }
  }
  progress.finish();
  loader.stop();
  save_checkpoint(!stopped_by_signal && st.step >= st.planned_steps, elapsed_total());
  if (root) tlog->write_curves();
  if (parallel)
    log_info("weights identical on all ", comm.size(), " ranks at step ", st.step, " (checksum ", std::hex,
             tensors_checksum(params), std::dec, ")");
  if (stopped_by_signal) {
    log_info("stopped by signal at step ", st.step, "; checkpoint saved in ", cfg.out / "checkpoint_last",
             " (continue with --resume)");
    return 0;
  }
  if (st.step < st.planned_steps && cfg.stop_after_steps > 0) {
    log_info("paused at step ", st.step, " of ", st.planned_steps, " (--stop-after)");
    return 0;
  }
  // A timed run ends fully decayed: the final weights are what the last step produced.
  with_mean_statistics([&] {
    if (root)
      nn::save_model(cfg.out / "model.safetensors", net, {{"format", "medseg"}, {"step", std::to_string(st.step)}});
  });
  log_info("training done: ", st.step, " steps in ", format_duration(seconds_since(t_start)),
           st.best_step >= 0 ? ", best mean validation Dice " + std::to_string(st.best_dice) + " at step " +
                                   std::to_string(st.best_step)
                             : std::string(),
           "; model bundle: ", cfg.out);
  return 0;
}
}  // namespace

}  // namespace medseg::pipelines
