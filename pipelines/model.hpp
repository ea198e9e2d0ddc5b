// Loading a trained model bundle for inference (see lib/nn/model_bundle.hpp for the layout).
#pragma once
#include <filesystem>
#include <memory>

#include <nlohmann/json.hpp>

#include "data/plan.hpp"
#include "nn/unet.hpp"

namespace medseg::pipelines {

struct LoadedModel {
  data::Plan plan;
  nn::UNetConfig network;
  nlohmann::json bundle;  // the whole plan.json
  std::unique_ptr<nn::UNet> net;
  std::filesystem::path weights;  // the file the weights came from
  bool keep_largest_component = false;
  bool trained_with_mirroring = true;  // bundle "augmentation" is full or mirror (or unrecorded)
};

// Reads MODEL_DIR/plan.json and MODEL_DIR/model.safetensors (or checkpoint_best when the final
// weights are absent). IoError naming the missing or malformed file.
LoadedModel load_model_bundle(const std::filesystem::path& dir);
// Only the plan of a bundle (labels, preprocessing), without the weights.
data::Plan read_bundle_plan(const std::filesystem::path& dir);

}  // namespace medseg::pipelines
