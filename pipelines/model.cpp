#include "pipelines/model.hpp"

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "nn/model_bundle.hpp"

namespace medseg::pipelines {

namespace {
nlohmann::json read_bundle_json(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw IoError("model folder " + dir.string() + " is a file; give the bundle's folder (the one "
                  "holding plan.json)");
  if (!fs::is_directory(dir, ec)) throw IoError("model folder " + dir.string() + " does not exist");
  const fs::path plan_path = dir / "plan.json";
  if (!fs::exists(plan_path))
    throw IoError(plan_path.string() + " is missing: " + dir.string() + " is not a medseg model bundle");
  try {
    return nlohmann::json::parse(read_file(plan_path));
  } catch (const nlohmann::json::exception& e) {
    throw IoError(plan_path.string() + ": malformed: " + e.what());
  }
}
}  // namespace

data::Plan read_bundle_plan(const std::filesystem::path& dir) {
  const auto j = read_bundle_json(dir);
  try {
    return data::Plan::from_json(j.at("plan"));
  } catch (const nlohmann::json::exception& e) {
    throw IoError((dir / "plan.json").string() + ": malformed: " + e.what());
  } catch (const ArgumentError& e) {
    throw IoError((dir / "plan.json").string() + ": " + e.what());
  }
}

LoadedModel load_model_bundle(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const fs::path plan_path = dir / "plan.json";
  LoadedModel m;
  m.bundle = read_bundle_json(dir);
  try {
    // The bundle format this build writes; a missing or later one is not read on trust.
    const auto fmt = m.bundle.find("format");
    if (fmt == m.bundle.end() || *fmt != "medseg-model-bundle/1")
      throw IoError(plan_path.string() + ": format is " +
                    (fmt == m.bundle.end() ? std::string("missing") : fmt->dump()) +
                    "; this medseg reads \"medseg-model-bundle/1\"");
    m.plan = data::Plan::from_json(m.bundle.at("plan"));
    m.network = nn::unet_config_from_json(m.bundle.at("network"));
    if (m.network.num_classes != m.plan.num_classes() || m.network.in_channels != m.plan.in_channels)
      throw IoError(plan_path.string() + ": the network has " + std::to_string(m.network.in_channels) +
                    " input channel(s) and " + std::to_string(m.network.num_classes) +
                    " classes, the plan " + std::to_string(m.plan.in_channels) + " and " +
                    std::to_string(m.plan.num_classes()) + " (labels)");
    m.keep_largest_component = m.bundle.value("keep_largest_component", false);
    m.trained_with_mirroring = m.bundle.value("augmentation", std::string("full")) != "none";
  } catch (const nlohmann::json::exception& e) {
    throw IoError(plan_path.string() + ": malformed: " + e.what());
  } catch (const ArgumentError& e) {
    throw IoError(plan_path.string() + ": " + e.what());
  }
  m.weights = dir / "model.safetensors";
  if (!fs::exists(m.weights)) {
    const fs::path best = nn::find_directory(dir, "checkpoint_best");
    if (best.empty() || !fs::exists(best / "model.safetensors"))
      throw IoError(m.weights.string() + " is missing (and no checkpoint_best/model.safetensors)");
    m.weights = best / "model.safetensors";
  }
  m.net = std::make_unique<nn::UNet>(m.network);
  nn::load_model(m.weights, *m.net);
  return m;
}

}  // namespace medseg::pipelines
