#include "infer/postprocess.hpp"

#include "core/error.hpp"

namespace medseg::infer {

std::vector<uint16_t> argmax_labels(const std::vector<float>& probabilities, int64_t voxels,
                                    int num_classes) {
  MEDSEG_CHECK(num_classes >= 1 && num_classes <= 65536, "num_classes = ", num_classes);
  MEDSEG_CHECK(static_cast<int64_t>(probabilities.size()) == voxels * num_classes,
               "probabilities hold ", probabilities.size(), " values, expected ", voxels, " x ",
               num_classes);
  std::vector<uint16_t> labels(static_cast<size_t>(voxels));
#pragma omp parallel for if (voxels >= (int64_t{1} << 15))  // tiny volumes: fork/join dominates
  for (int64_t v = 0; v < voxels; ++v) {
    const float* p = probabilities.data() + v * num_classes;
    int best = 0;
    for (int k = 1; k < num_classes; ++k)
      if (p[k] > p[best]) best = k;
    labels[static_cast<size_t>(v)] = static_cast<uint16_t>(best);
  }
  return labels;
}

int64_t keep_largest_component(LabelVolume& mask, int label) {
  const auto& n = mask.geo.size;
  MEDSEG_CHECK(static_cast<int64_t>(mask.data.size()) == mask.geo.voxels(), "mask holds ",
               mask.data.size(), " voxels, geometry says ", mask.geo.voxels());
  MEDSEG_CHECK(label > 0 && label < 65536, "label = ", label, " (background cannot be filtered)");
  const auto target = static_cast<uint16_t>(label);
  const int64_t total = mask.geo.voxels();
  // Component id per voxel (0 = not the label / not visited yet); flood fill with an explicit
  // stack.
  std::vector<int32_t> comp(static_cast<size_t>(total), 0);
  std::vector<int64_t> sizes{0};  // sizes[id]
  std::vector<int64_t> stack;
  for (int64_t start = 0; start < total; ++start) {
    if (mask.data[static_cast<size_t>(start)] != target || comp[static_cast<size_t>(start)] != 0)
      continue;
    const auto id = static_cast<int32_t>(sizes.size());
    int64_t count = 0;
    stack.push_back(start);
    comp[static_cast<size_t>(start)] = id;
    while (!stack.empty()) {
      const int64_t v = stack.back();
      stack.pop_back();
      ++count;
      const int64_t x = v % n[0], y = (v / n[0]) % n[1], z = v / (n[0] * n[1]);
      const int64_t nb[6][3] = {{x - 1, y, z}, {x + 1, y, z}, {x, y - 1, z},
                                {x, y + 1, z}, {x, y, z - 1}, {x, y, z + 1}};
      for (const auto& q : nb) {
        if (q[0] < 0 || q[0] >= n[0] || q[1] < 0 || q[1] >= n[1] || q[2] < 0 || q[2] >= n[2])
          continue;
        const int64_t w = (q[2] * n[1] + q[1]) * n[0] + q[0];
        if (mask.data[static_cast<size_t>(w)] == target && comp[static_cast<size_t>(w)] == 0) {
          comp[static_cast<size_t>(w)] = id;
          stack.push_back(w);
        }
      }
    }
    sizes.push_back(count);
  }
  if (sizes.size() <= 2) return 0;  // zero or one component: nothing to remove
  size_t keep = 1;
  for (size_t i = 2; i < sizes.size(); ++i)
    if (sizes[i] > sizes[keep]) keep = i;
  int64_t removed = 0;
  for (int64_t v = 0; v < total; ++v) {
    const int32_t c = comp[static_cast<size_t>(v)];
    if (c != 0 && static_cast<size_t>(c) != keep) {
      mask.data[static_cast<size_t>(v)] = 0;
      ++removed;
    }
  }
  return removed;
}

}  // namespace medseg::infer
