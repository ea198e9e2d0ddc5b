#include "pipelines/predict.hpp"

#include <chrono>
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
bool looks_like_image_file(const fs::path& p) {
  const std::string s = p.filename().string();
  for (const char* e : {".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"})
    if (s.size() > std::strlen(e) && s.compare(s.size() - std::strlen(e), std::strlen(e), e) == 0) return true;
  return false;
}
}  // namespace

int run_predict(const PredictConfig& cfg) {
  const DeviceChoice device = resolve_device(cfg.device, true);
  log_info(device.description);
  if (cfg.step <= 0 || cfg.step > 1) throw ArgumentError("--step must be in (0, 1], got " + std::to_string(cfg.step));
  LoadedModel m = load_model_bundle(cfg.model);
  const data::Plan& plan = m.plan;
  const auto cases = io::discover_inputs(cfg.input, plan.in_channels);
  if (cases.empty()) throw ArgumentError("no scans found in " + cfg.input.string());
  // A folder input (or several cases) writes a folder of masks; a single file input writes the file
  // named by --output unless that names an existing folder.
  const bool out_is_dir = fs::is_directory(cfg.input) || fs::is_directory(cfg.output) ||
                          !looks_like_image_file(cfg.output);
  // Every scan's header is checked before the first case runs (a folder with one broken file
  // fails at once, not after hours), and the output folders are made only when the first mask is
  // written: a run that fails early leaves nothing behind.
  for (const auto& c : cases)
    for (const auto& image : c.images) io::read_header(image);
  bool made_dirs = false;
  const auto make_output_dirs = [&] {
    if (made_dirs) return;
    if (out_is_dir) fs::create_directories(cfg.output);
    else if (!cfg.output.parent_path().empty()) fs::create_directories(cfg.output.parent_path());
    made_dirs = true;
  };
  place_network(device, *m.net, cfg.tf32);
  if (cfg.fold_norms) m.net->fold_norms();
  const bool keep_largest = cfg.keep_largest < 0 ? m.keep_largest_component : cfg.keep_largest == 1;
  const bool tta = cfg.tta < 0 ? m.trained_with_mirroring : cfg.tta == 1;
  log_info("model ", cfg.model, ": ", plan.num_classes() - 1, " label(s), patch ", plan.patch[0], "x",
           plan.patch[1], "x", plan.patch[2], ", TTA ", tta ? "on" : "off",
           cfg.tta < 0 ? (tta ? " (trained with mirroring)" : " (trained without mirroring)") : "",
           m.net->folded() ? ", norms folded" : "", keep_largest ? ", keep largest component" : "");

  nn::UNet& net = *m.net;
  auto forward = [&](const Tensor& x, Tensor& logits) { net.forward_infer(x, logits); };
  const int K = plan.num_classes();
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const auto& c = cases[ci];
    const auto t0 = std::chrono::steady_clock::now();
    auto read_scan = [&] {
      return c.images.size() == 1 ? io::read_image(c.images[0]) : io::read_image_channels(c.images);
    };
    data::PreprocessedCase pc = data::preprocess_case(plan, c.id, read_scan(), nullptr, 0);
    // The source scan is not held during inference (one float copy of the volume less at the peak);
    // the review export reads it again.
    Progress progress(15.0);
    infer::SlidingWindowOptions opt;
    opt.patch = plan.patch;
    opt.step = cfg.step;
    opt.tta = tta;
    opt.max_batch = std::max(1, cfg.tiles_per_batch);
    opt.progress = [&](int64_t done, int64_t total) {
      progress.update("case " + std::to_string(ci + 1) + "/" + std::to_string(cases.size()) + " " + c.id +
                      ": tile " + std::to_string(done) + "/" + std::to_string(total));
    };
    std::vector<float> probs =
        infer::sliding_window_probabilities(pc.image.data(), pc.shape, pc.channels, K, forward, opt);
    progress.finish();
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
        io::write_float_image(dir / (c.id + "_prob_" + plan.labels[k].name + ".nii.gz"), pv);
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
