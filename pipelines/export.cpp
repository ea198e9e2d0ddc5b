#include "pipelines/export.hpp"

#include <set>

#include "core/error.hpp"
#include "core/log.hpp"
#include "infer/export.hpp"
#include "io/image_io.hpp"

namespace medseg::pipelines {

int run_export(const ExportConfig& cfg) {
  // A 4-D NIfTI (MSD's multi-modal scans) of the model's channels is accepted: the overlays show its
  // first volume. A 3-D image is one channel file (nnU-Net's layout), shown as it is.
  const int volumes = io::read_header(cfg.image, true).volumes;
  const Volume image = io::read_image_channels({cfg.image}, volumes > 1 ? cfg.channels : 0);
  const LabelVolume mask = io::read_labels(cfg.mask);
  if (!image.geo.same_grid(mask.geo))
    throw IoError("mask " + cfg.mask.string() + " is not on the grid of image " +
                  cfg.image.string() + ": " + io::geometry_difference(mask.geo, image.geo));
  std::vector<io::LabelInfo> labels = cfg.labels;
  if (labels.empty()) {
    const std::set<uint16_t> values(mask.data.begin(), mask.data.end());
    for (uint16_t v : values)
      if (v > 0) labels.push_back({v, "label_" + std::to_string(v), io::default_label_color(v)});
  }
  for (auto& l : labels)
    if (l.value > 0 && l.color == std::array<uint8_t, 3>{0, 0, 0})
      l.color = io::default_label_color(l.value);
  const std::string id = io::case_id_from_path(cfg.image, true);
  const auto written = infer::write_review_package(cfg.out, id, image, mask, labels);
  log_info("export: ", written.size(), " files for ", id, " in ", cfg.out.string(),
           " (README.txt says how to open them)");
  return 0;
}

}  // namespace medseg::pipelines
