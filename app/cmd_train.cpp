#include <iostream>

#include "app/options.hpp"
#include "pipelines/train.hpp"

namespace medseg::app {

namespace po = boost::program_options;

int run_train_cmd(const std::vector<std::string>& args) {
  po::options_description desc(
      "medseg train --data DIR --out MODEL_DIR [options]\n"
      "Trains a 3-D U-Net on a labelled dataset folder (MSD, nnU-Net v2 or images/+labels/) and writes "
      "a model bundle.\nEvery option can also be given in an INI file (--config FILE, key = value)");
  pipelines::TrainConfig c;
  std::string patch;
  desc.add_options()
      ("data", po::value<std::string>()->required(), "dataset folder")
      ("out", po::value<std::string>()->required(), "model bundle folder (created)")
      ("config", po::value<std::string>(), "INI file with any of these options")
      ("norm", po::value<std::string>(&c.norm)->default_value(c.norm), "batchrenorm|batchnorm|instancenorm")
      ("batch-size", po::value<int>(&c.batch_size)->default_value(0), "batch size (0: plan default, 2)")
      ("patch", po::value<std::string>(&patch), "patch size D,H,W in voxels (default: from the plan)")
      ("iterations", po::value<int64_t>(&c.iterations)->default_value(0),
       "training steps (0: from --time-limit, else 10000)")
      ("time-limit", po::value<double>(&c.time_limit_minutes)->default_value(0),
       "fit the whole schedule into this many minutes of wall time")
      ("val-fraction", po::value<double>(&c.val_fraction)->default_value(c.val_fraction),
       "share of cases held out for validation")
      ("fold", po::value<int>(&c.fold)->default_value(-1), "k-fold validation: this fold (0-based)")
      ("folds", po::value<int>(&c.folds)->default_value(5), "k-fold validation: number of folds")
      ("seed", po::value<uint64_t>(&c.seed)->default_value(c.seed), "random seed")
      ("resume", po::bool_switch(&c.resume), "continue from MODEL_DIR/checkpoint_last")
      ("dry-run", po::bool_switch(&c.dry_run), "print the plan, parameter count, memory and time estimate")
      ("exclude-bad-cases", po::bool_switch(&c.exclude_bad_cases),
       "train without cases that fail validation instead of stopping")
      ("base-filters", po::value<int>(&c.base_filters)->default_value(c.base_filters), "filters at level 0")
      ("optimizer", po::value<std::string>(&c.optimizer)->default_value(c.optimizer), "sgd|adamw")
      ("lr", po::value<double>(&c.lr)->default_value(c.lr), "initial learning rate (poly decay)")
      ("epoch-length", po::value<int64_t>(&c.epoch_length)->default_value(0),
       "steps between validations (0: automatic)")
      ("workers", po::value<int>(&c.workers)->default_value(c.workers), "data loader threads")
      ("augment", po::value<std::string>(&c.augment)->default_value(c.augment),
       "augmentation: none, mirror (flips only) or full (nnU-Net's spatial + intensity set, for "
       "long runs)")
      ("no-augment", "same as --augment none")
      ("deep-supervision", po::bool_switch(&c.deep_supervision),
       "auxiliary heads on the decoder at 1/2, 1/4, ... resolution, trained against downsampled labels "
       "(loss weights 2^-level, normalised); recorded in the model, used only in training")
      ("report-batch-stats", "at the end, also report validation Dice in training mode (batch "
       "statistics) next to inference mode (running statistics)")
      ("max-validation-cases", po::value<int>(&c.max_validation_cases)->default_value(0),
       "validate on at most this many cases (0: all)")
      ("renorm-warmup", po::value<double>(&c.renorm_warmup)->default_value(c.renorm_warmup),
       "fraction of steps with r_max=1, d_max=0")
      ("renorm-r-end", po::value<double>(&c.renorm_r_end)->default_value(c.renorm_r_end),
       "fraction of steps where r_max reaches its final value")
      ("renorm-d-end", po::value<double>(&c.renorm_d_end)->default_value(c.renorm_d_end),
       "fraction of steps where d_max reaches its final value")
      ("r-max", po::value<float>(&c.r_max)->default_value(c.r_max), "final r_max")
      ("d-max", po::value<float>(&c.d_max)->default_value(c.d_max), "final d_max")
      ("norm-momentum", po::value<float>(&c.norm_momentum)->default_value(c.norm_momentum),
       "moving-average rate alpha of the running statistics (batchrenorm, batchnorm)")
      ("same-batches-on-all-ranks", po::bool_switch(&c.same_batches_on_all_ranks),
       "mpirun only, for verification: every rank samples the same patches, so that the run must "
       "equal a single-process run")
      ("stop-after", po::value<int64_t>(&c.stop_after_steps)->default_value(0),
       "pause after this many steps of this process (checkpoint saved; continue with --resume)");
  add_common(desc, true);
  auto vm = parse(desc, args, "train");
  if (!vm) return 0;
  apply_common(*vm);
  c.data = (*vm)["data"].as<std::string>();
  c.out = (*vm)["out"].as<std::string>();
  c.device = (*vm)["device"].as<std::string>();
  c.tf32 = !vm->count("no-tf32");
  c.threads = (*vm)["threads"].as<int>();
  if (vm->count("no-augment")) c.augment = "none";
  c.report_batch_stats = vm->count("report-batch-stats") > 0;
  if (!patch.empty()) c.patch = parse_triple(patch, "patch");
  return pipelines::run_train(c);
}

}  // namespace medseg::app
