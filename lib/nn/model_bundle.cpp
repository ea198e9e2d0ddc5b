#include "nn/model_bundle.hpp"

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "nn/safetensors.hpp"

namespace medseg::nn {

nlohmann::json unet_config_to_json(const UNetConfig& c) {
  return {{"in_channels", c.in_channels},
          {"num_classes", c.num_classes},
          {"levels", c.levels},
          {"base_filters", c.base_filters},
          {"max_filters", c.max_filters},
          {"convs_per_stage", c.convs_per_stage},
          {"norm", norm_kind_name(c.norm.kind)},
          {"norm_eps", c.norm.eps},
          {"norm_alpha", c.norm.alpha},
          {"leaky_slope", c.norm.slope},
          {"deep_supervision", c.deep_supervision},
          {"weight_layout", "conv (Cout,k,k,k,Cin); transposed (Cin,2,2,2,Cout); activations NDHWC"}};
}

UNetConfig unet_config_from_json(const nlohmann::json& j) {
  UNetConfig c;
  try {
    c.in_channels = j.at("in_channels").get<int>();
    c.num_classes = j.at("num_classes").get<int>();
    c.levels = j.at("levels").get<int>();
    c.base_filters = j.at("base_filters").get<int>();
    c.max_filters = j.at("max_filters").get<int>();
    c.convs_per_stage = j.at("convs_per_stage").get<int>();
    c.norm.kind = parse_norm_kind(j.at("norm").get<std::string>());
    c.norm.eps = j.at("norm_eps").get<float>();
    c.norm.alpha = j.at("norm_alpha").get<float>();
    c.norm.slope = j.at("leaky_slope").get<float>();
    c.deep_supervision = j.value("deep_supervision", false);  // absent in bundles before it existed
  } catch (const nlohmann::json::exception& e) {
    throw ArgumentError(std::string("malformed network description: ") + e.what());
  }
  // The ranges UNet accepts, as a user-facing error (a damaged plan.json, not a program bug).
  const auto range = [](const char* what, int v, int lo, int hi) {
    if (v < lo || v > hi)
      throw ArgumentError(std::string("malformed network description: ") + what + " = " +
                          std::to_string(v) + " (must be " + std::to_string(lo) + " to " +
                          std::to_string(hi) + ")");
  };
  range("levels", c.levels, 1, 7);
  range("in_channels", c.in_channels, 1, 64);
  range("num_classes", c.num_classes, 2, 65536);
  range("base_filters", c.base_filters, 1, 4096);
  range("max_filters", c.max_filters, c.base_filters, 65536);
  range("convs_per_stage", c.convs_per_stage, 1, 8);
  const auto positive = [](const char* what, float v, float hi) {
    if (!(v > 0.f && v <= hi))
      throw ArgumentError(std::string("malformed network description: ") + what + " = " +
                          std::to_string(v) + " (must be > 0 and <= " + std::to_string(hi) + ")");
  };
  positive("norm_eps", c.norm.eps, 1.f);
  positive("norm_alpha", c.norm.alpha, 1.f);
  positive("leaky_slope", c.norm.slope, 1.f);
  return c;
}

std::vector<NamedTensor> model_tensors(UNet& net) {
  auto all = net.parameters();
  for (auto& b : net.buffers()) all.push_back(b);
  return all;
}

void write_directory_atomic(const fs::path& dir, const std::string& name,
                            const std::function<void(const fs::path& tmpdir)>& write) {
  const fs::path final_dir = dir / name;
  const fs::path tmp = temporary_sibling(final_dir);
  const fs::path old = dir / (name + ".old");
  std::error_code ec;
  try {
    fs::create_directories(tmp);
    write(tmp);
    fs::remove_all(old, ec);
    if (fs::exists(final_dir)) fs::rename(final_dir, old);
    fs::rename(tmp, final_dir);
    fs::remove_all(old, ec);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw IoError("cannot write " + final_dir.string() + ": " + e.code().message());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

fs::path find_directory(const fs::path& dir, const std::string& name) {
  if (fs::is_directory(dir / name)) return dir / name;
  if (fs::is_directory(dir / (name + ".old"))) return dir / (name + ".old");
  return {};
}

void save_model(const fs::path& file, UNet& net, const std::map<std::string, std::string>& meta) {
  save_safetensors(file, model_tensors(net), meta);
}

void load_model(const fs::path& file, UNet& net) { load_safetensors(file, model_tensors(net)); }

}  // namespace medseg::nn
