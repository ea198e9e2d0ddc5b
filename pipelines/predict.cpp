#include "pipelines/predict.hpp"

#include <cctype>
#include <chrono>
#include <map>
#include <set>
#include <iomanip>
#include <sstream>

#include "core/error.hpp"
#include "core/log.hpp"
#include "data/preprocess.hpp"
#include "infer/export.hpp"
#include "infer/postprocess.hpp"
#include "infer/sliding_window.hpp"
#include "io/dataset.hpp"
#include "io/image_io.hpp"
#include "pipelines/device.hpp"
#include "pipelines/model.hpp"
#include "pipelines/progress.hpp"

namespace medseg::pipelines {

namespace {
bool ends_with_nocase(const std::string& s, const std::string& suffix) {
  if (s.size() <= suffix.size()) return false;
  for (size_t i = 0; i < suffix.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[s.size() - suffix.size() + i])) != suffix[i])
      return false;
  return true;
}

// The mask file names predict writes: NIfTI only (write_labels writes .nii / .nii.gz).
bool names_a_mask_file(const fs::path& p) {
  const std::string s = p.filename().string();
  return ends_with_nocase(s, ".nii.gz") || ends_with_nocase(s, ".nii");
}

// A label name as part of a file name: anything but letters, digits, '-', '_' and '.' becomes '_'
// ("NCR/NET" would otherwise name a folder that does not exist).
std::string file_name_part(const std::string& name) {
  std::string out = name;
  for (char& ch : out)
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.'))
      ch = '_';
  if (out.empty() || out == "." || out == "..") out = "label";
  return out;
}

fs::path canonical_or_absolute(const fs::path& p) {
  std::error_code ec;
  fs::path c = fs::weakly_canonical(p, ec);
  return ec ? fs::absolute(p).lexically_normal() : c;
}
}  // namespace

int run_predict(const PredictConfig& cfg) {
  const DeviceChoice device = resolve_device(cfg.device, true);
  log_info(device.description);
  // Tiles grow as (1 / step)^3: below 0.1 a scan takes over 1000 times the work of step 1.
  if (!(cfg.step >= 0.1 && cfg.step <= 1))
    throw ArgumentError("--step must be between 0.1 and 1 (a fraction of the patch), got " +
                        std::to_string(cfg.step));
  if (cfg.tiles_per_batch < 1)
    throw ArgumentError("--tiles-per-batch must be >= 1, got " + std::to_string(cfg.tiles_per_batch));
  if (cfg.keep_largest < -1 || cfg.keep_largest > 1)
    throw ArgumentError("--keep-largest must be 1 (on), 0 (off) or -1 (as the model records), got " +
                        std::to_string(cfg.keep_largest));
  if (cfg.models.empty()) throw ArgumentError("--model: give at least one model bundle");
  // Several models are an ensemble (the folds of a cross-validation): their softmax probabilities
  // are averaged on the preprocessed grid, so they must preprocess alike and share the labels.
  std::vector<LoadedModel> models;
  for (const auto& dir : cfg.models) models.push_back(load_model_bundle(dir));
  const data::Plan& plan = models.front().plan;
  for (size_t i = 1; i < models.size(); ++i) {
    const data::Plan& other = models[i].plan;
    const std::string pair = "--model " + cfg.models[i].string() + " and " + cfg.models[0].string();
    bool same_labels = other.labels.size() == plan.labels.size();
    for (size_t k = 0; same_labels && k < plan.labels.size(); ++k)
      same_labels = other.labels[k].value == plan.labels[k].value && other.labels[k].name == plan.labels[k].name;
    if (!same_labels || other.in_channels != plan.in_channels)
      throw ArgumentError(pair + " segment different labels or channels: an ensemble needs models of one "
                          "dataset");
    if (other.channel_names != plan.channel_names) {
      const auto list = [](const std::vector<std::string>& v) {
        std::string s;
        for (const auto& n : v) s += (s.empty() ? "" : ", ") + n;
        return "{" + s + "}";
      };
      throw ArgumentError(pair + " read their channels as " + list(other.channel_names) + " and " +
                          list(plan.channel_names) + ": an ensemble needs the same channels in the "
                          "same order");
    }
    if (other.preprocessing_hash() != plan.preprocessing_hash())
      throw ArgumentError(pair + " preprocess differently (target spacing or intensity normalisation): "
                          "an ensemble needs models planned on the same dataset, e.g. the folds of one "
                          "plan");
  }
  const auto cases = io::discover_inputs(cfg.input, plan.in_channels);
  if (cases.empty()) throw ArgumentError("no scans found in " + cfg.input.string());
  // A folder input (or several cases) writes a folder of masks; a single file input writes the file
  // named by --output unless that names an existing folder.
  std::error_code ec;
  const bool out_is_dir = fs::is_directory(cfg.input, ec) || fs::is_directory(cfg.output, ec) ||
                          !names_a_mask_file(cfg.output);
  if (!fs::is_directory(cfg.input, ec) && !fs::is_directory(cfg.output, ec) &&
      !names_a_mask_file(cfg.output) && cfg.output.has_extension())
    throw ArgumentError("--output " + cfg.output.string() +
                        ": a mask file must end in .nii.gz or .nii (or name an existing folder)");
  if (out_is_dir && fs::exists(cfg.output, ec) && !fs::is_directory(cfg.output, ec))
    throw ArgumentError("--output " + cfg.output.string() + " exists and is not a folder");
  if (!cfg.export_dir.empty() && fs::exists(cfg.export_dir, ec) && !fs::is_directory(cfg.export_dir, ec))
    throw ArgumentError("--export " + cfg.export_dir.string() + " exists and is not a folder");
  // The folders to be made must not sit under a file.
  for (fs::path dir : {out_is_dir ? cfg.output : cfg.output.parent_path(), cfg.export_dir}) {
    if (dir.empty()) continue;  // the current folder, or no --export
    dir = fs::absolute(dir).lexically_normal();
    while (!dir.empty() && dir != dir.root_path() && !fs::exists(dir, ec)) dir = dir.parent_path();
    if (!dir.empty() && !fs::is_directory(dir, ec))
      throw ArgumentError("cannot make folders under " + dir.string() + ": it is a file");
  }
  // No output may replace an input scan (a mask written over its own scan loses the scan).
  {
    std::set<fs::path> inputs;
    for (const auto& c : cases)
      for (const auto& image : c.images) inputs.insert(canonical_or_absolute(image));
    for (const auto& c : cases) {
      const fs::path mask = out_is_dir ? cfg.output / (c.id + ".nii.gz") : cfg.output;
      if (inputs.count(canonical_or_absolute(mask)))
        throw ArgumentError("--output " + cfg.output.string() + ": the mask of " + c.id +
                            " would overwrite the input scan " + mask.string());
    }
  }
  // Every scan is read and checked before the first case runs (a folder with one broken file
  // fails at once, not after hours, and leaves no masks of the cases before it), and the output
  // folders are made only when the first mask is written: a run that fails early leaves nothing
  // behind. Headers first (cheap), then, with several cases, the voxels (NaN/Inf, the channels'
  // grids): reading a scan costs a small fraction of its inference.
  const auto read_case = [&](const io::CaseEntry& c) {
    return io::read_image_channels(c.images, plan.in_channels);
  };
  for (const auto& c : cases) {
    // One file of a multi-channel model is MSD's 4-D layout: a volume per channel.
    const bool volumes = c.images.size() == 1 && plan.in_channels > 1;
    for (const auto& image : c.images) {
      const io::ImageHeader h = io::read_header(image, volumes);
      if (volumes && h.volumes != plan.in_channels)
        throw ArgumentError(image.string() + ": has " + std::to_string(h.volumes) + " volume" +
                      (h.volumes == 1 ? "" : "s") + " along its 4th axis; the model takes " +
                      std::to_string(plan.in_channels) +
                      " channels (one volume each, or nnU-Net's files {CASE}_0000 .. _" +
                      std::to_string(10000 + plan.in_channels - 1).substr(1) + ")");
    }
  }
  if (cases.size() > 1)
    for (const auto& c : cases) read_case(c);
  bool made_dirs = false;
  const auto make_output_dirs = [&] {
    if (made_dirs) return;
    if (out_is_dir) fs::create_directories(cfg.output);
    else if (!cfg.output.parent_path().empty()) fs::create_directories(cfg.output.parent_path());
    made_dirs = true;
  };
  const bool keep_largest =
      cfg.keep_largest < 0 ? models.front().keep_largest_component : cfg.keep_largest == 1;
  std::vector<bool> tta;
  for (size_t i = 0; i < models.size(); ++i) {
    LoadedModel& m = models[i];
    place_network(device, *m.net, cfg.tf32);
    if (cfg.fold_norms) m.net->fold_norms();
    tta.push_back(cfg.tta < 0 ? m.trained_with_mirroring : cfg.tta == 1);
    if (tta.back() && !m.trained_with_mirroring)
      log_warn("--tta on a model trained without mirroring (", cfg.models[i].string(),
               "): it averages flipped views its network never saw, which can ruin the masks "
               "(hippocampus, session 9: mean Dice 0.888 without TTA, 0.014 with it)");
    log_info("model ", cfg.models[i], ": ", m.plan.num_classes() - 1, " label(s), patch ",
             m.plan.patch[0], "x", m.plan.patch[1], "x", m.plan.patch[2], ", TTA ",
             tta.back() ? "on" : "off",
             cfg.tta < 0 ? (tta.back() ? " (trained with mirroring)" : " (trained without mirroring)") : "",
             m.net->folded() ? ", norms folded" : "");
  }
  if (models.size() > 1) log_info("ensemble of ", models.size(), " models: probabilities averaged");
  if (keep_largest)
    log_info("keep the largest connected component per label",
             cfg.keep_largest < 0 ? (models.size() > 1 ? " (as the first model records)" : " (as the model records)")
                                  : "");

  // Probability map names: the label names as file-name parts, made unique with the label value
  // where two would collide (empty, repeated, or names that differ only in replaced characters).
  std::vector<std::string> prob_names;
  {
    std::map<std::string, int> uses;
    for (const auto& l : plan.labels) ++uses[file_name_part(l.name)];
    for (const auto& l : plan.labels) {
      const std::string n = file_name_part(l.name);
      prob_names.push_back(uses[n] > 1 || l.name.empty() ? n + "_" + std::to_string(l.value) : n);
    }
  }
  const int K = plan.num_classes();
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const auto& c = cases[ci];
    const auto t0 = std::chrono::steady_clock::now();
    auto read_scan = [&] { return read_case(c); };
    data::PreprocessedCase pc = data::preprocess_case(plan, c.id, read_scan(), nullptr, 0);
    // The source scan is not held during inference (one float copy of the volume less at the peak);
    // the review export reads it again.
    std::vector<float> probs;
    for (size_t mi = 0; mi < models.size(); ++mi) {
      Progress progress(15.0);
      infer::SlidingWindowOptions opt;
      opt.patch = models[mi].plan.patch;
      opt.step = cfg.step;
      opt.tta = tta[mi];
      opt.max_batch = std::max(1, cfg.tiles_per_batch);
      const std::string which =
          models.size() > 1 ? " model " + std::to_string(mi + 1) + "/" + std::to_string(models.size()) : "";
      opt.progress = [&](int64_t done, int64_t total) {
        progress.update("case " + std::to_string(ci + 1) + "/" + std::to_string(cases.size()) + " " +
                        c.id + which + ": tile " + std::to_string(done) + "/" + std::to_string(total));
      };
      nn::UNet& net = *models[mi].net;
      auto forward = [&](const Tensor& x, Tensor& logits) { net.forward_infer(x, logits); };
      std::vector<float> p =
          infer::sliding_window_probabilities(pc.image.data(), pc.shape, pc.channels, K, forward, opt);
      progress.finish();
      if (mi == 0) {
        probs = std::move(p);
      } else {
        for (size_t q = 0; q < probs.size(); ++q) probs[q] += p[q];
      }
    }
    if (models.size() > 1) {
      const float inv = 1.0f / static_cast<float>(models.size());
      for (float& v : probs) v *= inv;
    }
    pc.image = {};  // free the preprocessed copy before going back to the source grid
    const data::CaseGeometryMap map = pc.map;
    LabelVolume mask;
    std::vector<float> source_probs;
    if (cfg.probabilities) {
      source_probs = data::probabilities_to_source(map, probs.data(), K);
      mask = data::argmax_labels(source_probs.data(), K, map.source);
    } else {
      mask = data::labels_to_source(map, probs.data(), K);
    }
    probs = {};
    if (keep_largest)
      for (int k = 1; k < K; ++k) infer::keep_largest_component(mask, k);
    const fs::path mask_path = out_is_dir ? cfg.output / (c.id + ".nii.gz") : cfg.output;
    make_output_dirs();
    io::write_labels(mask_path, mask);
    if (cfg.probabilities) {
      for (int k = 0; k < K; ++k) {
        Volume pv;
        pv.geo = mask.geo;
        pv.channels = 1;
        pv.data.resize(static_cast<size_t>(mask.geo.voxels()));
        for (int64_t q = 0; q < mask.geo.voxels(); ++q) pv.data[q] = source_probs[q * K + k];
        const fs::path dir = out_is_dir ? cfg.output : cfg.output.parent_path();
        io::write_float_image(dir / (c.id + "_prob_" + prob_names[static_cast<size_t>(k)] + ".nii.gz"), pv);
      }
    }
    if (!cfg.export_dir.empty())
      infer::write_review_package(cfg.export_dir / c.id, c.id, read_scan(), mask, plan.labels);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::ostringstream vols;
    for (int k = 1; k < K; ++k) {
      int64_t n = 0;
      for (uint16_t v : mask.data) n += v == k;
      vols << " " << plan.labels[k].name << " " << std::fixed << std::setprecision(2)
           << static_cast<double>(n) * mask.geo.voxel_volume_mm3() / 1000.0 << " mL";
    }
    log_info("case ", ci + 1, "/", cases.size(), " ", c.id, " -> ", mask_path.string(), " (",
             std::fixed, std::setprecision(1), s, " s;", vols.str(), ")");
  }
  return 0;
}

}  // namespace medseg::pipelines
