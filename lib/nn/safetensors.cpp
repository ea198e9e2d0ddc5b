#include "nn/safetensors.hpp"

#include <cmath>
#include <cstring>
#include <sstream>
#include <nlohmann/json.hpp>

#include "core/atomic_file.hpp"
#include "core/error.hpp"

namespace medseg::nn {

namespace {
std::vector<int64_t> dims_of(const Tensor& t) {
  const Shape& s = t.shape();
  if (s.n == 1 && s.d == 1 && s.h == 1 && s.w == 1) return {s.c};
  return {s.n, s.d, s.h, s.w, s.c};
}
}  // namespace

void save_safetensors(const std::filesystem::path& path, const std::vector<NamedTensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& t : tensors) {
    const size_t bytes = t.value->bytes();
    header[t.name] = {{"dtype", "F32"}, {"shape", dims_of(*t.value)}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');  // align the data to 8 bytes (spec allows padding)
  std::string buf(8 + h.size() + offset, '\0');
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) buf[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  std::memcpy(buf.data() + 8, h.data(), h.size());
  size_t pos = 8 + h.size();
  for (const auto& t : tensors) {
    t.value->read_to(reinterpret_cast<float*>(buf.data() + pos));
    pos += t.value->bytes();
  }
  write_file_atomic(path, buf.data(), buf.size());
}

std::map<std::string, std::string> load_safetensors(const std::filesystem::path& path,
                                                    const std::vector<NamedTensor>& tensors) {
  const std::string buf = read_file(path);
  const std::string where = path.string();
  if (buf.size() < 8) throw IoError(where + ": not a safetensors file (shorter than 8 bytes)");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(buf[i])) << (8 * i);
  if (n > buf.size() - 8) throw IoError(where + ": header length " + std::to_string(n) + " exceeds the file size");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(buf.substr(8, n));
  } catch (const std::exception& e) {
    throw IoError(where + ": malformed safetensors header: " + e.what());
  }
  const size_t data0 = 8 + n;
  if (!header.is_object()) throw IoError(where + ": malformed safetensors header: not a JSON object");
  for (const auto& t : tensors) {
    if (!header.contains(t.name)) throw IoError(where + ": tensor '" + t.name + "' is missing");
    const auto& e = header[t.name];
    const std::string what = where + ": tensor '" + t.name + "'";
    std::vector<int64_t> shape;
    size_t a = 0, b = 0;
    try {
      if (e.value("dtype", "") != "F32") throw IoError(what + " is not F32");
      shape = e.at("shape").get<std::vector<int64_t>>();
      const auto& off = e.at("data_offsets");
      if (!off.is_array() || off.size() != 2) throw IoError(what + ": data_offsets is not a pair");
      a = off[0].get<size_t>();
      b = off[1].get<size_t>();
    } catch (const nlohmann::json::exception& ex) {
      throw IoError(what + " is malformed: " + ex.what());
    }
    // The exact shape, not just the count: a permuted shape is another layout's weights.
    if (shape != dims_of(*t.value)) {
      const auto list = [](const std::vector<int64_t>& v) {
        std::ostringstream os;
        for (size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
        return os.str();
      };
      throw IoError(what + " has shape [" + list(shape) + "], the model expects [" +
                    list(dims_of(*t.value)) + "]");
    }
    const int64_t count = t.value->numel();
    if (b < a || b - a != t.value->bytes() || data0 + b > buf.size())
      throw IoError(what + " has bad data offsets (file truncated?)");
    // NaN / Inf weights (a damaged or diverged model) would give a confident-looking garbage mask.
    const char* raw = buf.data() + data0 + a;
    for (int64_t i = 0; i < count; ++i) {
      float v;
      std::memcpy(&v, raw + i * 4, 4);
      if (!std::isfinite(v))
        throw IoError(what + " holds a non-finite value (" + std::to_string(v) + " at index " +
                      std::to_string(i) + "): the model is damaged");
    }
    t.value->assign_from(reinterpret_cast<const float*>(raw));
  }
  std::map<std::string, std::string> meta;
  if (header.contains("__metadata__")) {
    const auto& m = header["__metadata__"];
    if (!m.is_object()) throw IoError(where + ": __metadata__ is not a JSON object");
    for (auto& [k, v] : m.items()) {
      if (!v.is_string()) throw IoError(where + ": __metadata__ value '" + k + "' is not a string");
      meta[k] = v.get<std::string>();
    }
  }
  return meta;
}

}  // namespace medseg::nn
