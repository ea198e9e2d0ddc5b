// The parts of planning that read files: the dataset fingerprint and plan.json.
#include <fstream>
#include <sstream>

#include "core/error.hpp"
#include "core/log.hpp"
#include "core/rng.hpp"
#include "data/plan.hpp"
#include "data/preprocess.hpp"
#include "io/image_io.hpp"

namespace medseg::data {

Fingerprint fingerprint_dataset(const io::Dataset& ds, int max_cases, uint64_t seed) {
  std::vector<const io::CaseEntry*> labelled;
  for (const auto& c : ds.training)
    if (!c.label.empty()) labelled.push_back(&c);
  if (labelled.empty())
    throw ArgumentError("dataset '" + ds.name + "' (" + ds.root.string() +
                        ") has no labelled training case to plan from");
  if (max_cases > 0 && static_cast<size_t>(max_cases) < labelled.size())
    labelled.resize(static_cast<size_t>(max_cases));

  const int channels = ds.num_channels();
  std::vector<CaseFingerprint> cases;
  std::vector<std::vector<float>> samples(static_cast<size_t>(std::max(channels, 0)));
  const Rng root(seed);
  for (size_t i = 0; i < labelled.size(); ++i) {
    const io::CaseEntry& e = *labelled[i];
    const Volume image = io::read_image_channels(e.images, channels);
    const LabelVolume labels = io::read_labels(e.label);
    if (image.channels != channels)
      throw ArgumentError("case '" + e.id + "' (" + e.images.front().string() + ") has " +
                          std::to_string(image.channels) + " channels, dataset declares " +
                          std::to_string(channels));
    if (labels.geo.size != image.geo.size)
      throw ArgumentError("case '" + e.id + "': label " + e.label.string() + " has size " +
                          labels.geo.describe() + ", image has " + image.geo.describe());

    const Orientation o = canonical_orientation(image.geo);
    const CropBox box = nonzero_box(image);  // (z, y, x) in source axes
    const std::array<int64_t, 3> crop_xyz{box.shape()[2], box.shape()[1], box.shape()[0]};
    CaseFingerprint cf;
    cf.id = e.id;
    for (int a = 0; a < 3; ++a) {
      cf.spacing[a] = image.geo.spacing[o.perm[a]];
      cf.shape[a] = image.geo.size[o.perm[a]];
      cf.cropped_shape[a] = crop_xyz[o.perm[a]];
    }
    cases.push_back(cf);

    // Selection sampling (Knuth's algorithm S): a uniform sample without replacement of the
    // foreground voxels in one pass, without storing all their indices.
    int64_t fg = 0;
    for (uint16_t v : labels.data) fg += v > 0;
    int64_t want = std::min<int64_t>(fg, kFingerprintSamplesPerCase);
    Rng rng = root.split(i);
    int64_t left = fg;
    for (size_t v = 0; v < labels.data.size() && want > 0; ++v) {
      if (labels.data[v] == 0) continue;
      if (static_cast<double>(left) * rng.uniform() < static_cast<double>(want)) {
        for (int c = 0; c < channels; ++c) samples[c].push_back(image.data[v * channels + c]);
        --want;
      }
      --left;
    }
  }
  log_debug("fingerprint of '", ds.name, "': ", cases.size(), " cases, ",
            samples.empty() ? 0 : samples[0].size(), " foreground samples per channel");
  return summarize_fingerprint(std::move(cases), std::move(samples));
}

Plan read_plan(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(path.string() + ": cannot open the plan file");
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    throw IoError(path.string() + ": not valid JSON (" + e.what() + ")");
  }
  try {
    return Plan::from_json(j);
  } catch (const ArgumentError& e) {
    throw ArgumentError(path.string() + ": " + e.what());
  }
}

void write_plan(const std::filesystem::path& path, const Plan& plan) {
  io::write_text_atomic(path, plan.to_json().dump(2) + "\n");
}

}  // namespace medseg::data
