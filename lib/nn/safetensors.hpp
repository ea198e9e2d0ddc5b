// The safetensors format (8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the raw little-endian data), so
// that PyTorch's `safetensors` package reads our weights. Only F32 tensors are written.
#pragma once
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "nn/unet.hpp"

namespace medseg::nn {

// Shapes are written as our native layouts, 5-D: conv weights (Cout, k, k, k, Cin), transposed
// (Cin, 2, 2, 2, Cout), vectors (C). Written atomically (temp + rename).
void save_safetensors(const std::filesystem::path& path, const std::vector<NamedTensor>& tensors,
                      const std::map<std::string, std::string>& metadata);
// Loads every named tensor into the given ones (names and element counts must match; IoError naming
// the file otherwise). Returns the metadata.
std::map<std::string, std::string> load_safetensors(const std::filesystem::path& path,
                                                    const std::vector<NamedTensor>& tensors);

}  // namespace medseg::nn
