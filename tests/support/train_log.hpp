// Reading a training run's log.jsonl in tests.
#pragma once
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace medseg::test {

// The loss of every logged training step (records of kind "step"), in order.
inline std::vector<double> step_losses(const std::filesystem::path& bundle) {
  std::ifstream in(bundle / "log.jsonl");
  std::string line;
  std::vector<double> out;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] == "step") out.push_back(j["loss"].get<double>());
  }
  return out;
}

}  // namespace medseg::test
