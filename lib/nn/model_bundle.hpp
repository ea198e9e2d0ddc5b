// The model bundle: a directory that holds everything predict needs and everything resume needs.
//   plan.json                 preprocessing plan, labels (names, colours), architecture, norm, schedule,
//                             training summary, versions (see docs/model-bundle.md)
//   model.safetensors         final weights: parameters and running statistics, native layouts
//   checkpoint_best/          model.safetensors of the best validation epoch
//   checkpoint_last/          model.safetensors, optimizer.safetensors, state.json (exact resume)
//   log.jsonl, log.csv        one line per logged step / epoch
//   curves.svg                loss and validation Dice
// Checkpoint folders are replaced atomically: written as <name>.tmp-*, the old one renamed to
// <name>.old, the new one renamed into place, the old one removed. A reader that finds no <name>
// (killed between the renames) takes <name>.old.
#pragma once
#include <filesystem>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "nn/optimizer.hpp"
#include "nn/unet.hpp"

namespace medseg::nn {

namespace fs = std::filesystem;

nlohmann::json unet_config_to_json(const UNetConfig& c);
UNetConfig unet_config_from_json(const nlohmann::json& j);  // ArgumentError on malformed

// All tensors of a model (parameters then running statistics), for saving and loading.
std::vector<NamedTensor> model_tensors(UNet& net);

// Writes dir/name/ atomically with the given files produced by `write(tmpdir)`.
void write_directory_atomic(const fs::path& dir, const std::string& name,
                            const std::function<void(const fs::path& tmpdir)>& write);
// dir/name, or dir/name.old when only that exists; empty path when neither.
fs::path find_directory(const fs::path& dir, const std::string& name);

void save_model(const fs::path& file, UNet& net, const std::map<std::string, std::string>& meta);
void load_model(const fs::path& file, UNet& net);

}  // namespace medseg::nn
