#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "infer/synthetic.hpp"
#include "io/dataset.hpp"
#include "io/image_io.hpp"

namespace medseg::infer {
namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path p =
      fs::temp_directory_path() / ("medseg_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p;
}

// Small cases keep the test fast; the structures are sized in mm, so 40 x 40 x 12 still holds them.
SyntheticOptions small(uint64_t seed) {
  SyntheticOptions o;
  o.train_cases = 2;
  o.test_cases = 1;
  o.seed = seed;
  o.size = {40, 40, 12};
  return o;
}

TEST(Synthetic, SameSeedGivesIdenticalVoxelsAndGeometry) {
  const auto a = generate_synthetic_case(small(3), 1);
  const auto b = generate_synthetic_case(small(3), 1);
  EXPECT_EQ(a.id, "synth_002");
  EXPECT_EQ(a.image.data, b.image.data);
  EXPECT_EQ(a.labels.data, b.labels.data);
  EXPECT_EQ(a.image.geo.origin, b.image.geo.origin);
  EXPECT_EQ(a.image.geo.direction, b.image.geo.direction);
}

TEST(Synthetic, OtherSeedOrCaseGivesOtherScans) {
  const auto a = generate_synthetic_case(small(3), 0);
  EXPECT_NE(a.image.data, generate_synthetic_case(small(4), 0).image.data);
  EXPECT_NE(a.labels.data, generate_synthetic_case(small(4), 0).labels.data);
  EXPECT_NE(a.labels.data, generate_synthetic_case(small(3), 1).labels.data);
}

TEST(Synthetic, CasesLookLikeAnisotropicScansWithBothStructures) {
  for (int i = 0; i < 3; ++i) {
    const auto c = generate_synthetic_case(SyntheticOptions{}, i);
    const Geometry& g = c.image.geo;
    EXPECT_EQ(g.size, (std::array<int64_t, 3>{64, 64, 24}));
    EXPECT_EQ(g.spacing, (std::array<double, 3>{0.8, 0.8, 2.5}));
    EXPECT_EQ(g.direction, (std::array<double, 9>{-1, 0, 0, 0, -1, 0, 0, 0, 1}));
    int64_t count[3] = {0, 0, 0};
    double sum[3] = {0, 0, 0};
    for (size_t v = 0; v < c.labels.data.size(); ++v) {
      const uint16_t l = c.labels.data[v];
      ASSERT_LE(l, 2) << "voxel " << v;
      const float x = c.image.data[v];
      ASSERT_EQ(x, std::round(x)) << "voxel " << v << " is not integer-valued";
      ASSERT_TRUE(x >= -32768 && x <= 32767) << "voxel " << v << " = " << x;
      ++count[l];
      sum[l] += x;
    }
    // Sizes in the ranges the header promises (organ 9-15 x 8-13 x 12-20 mm semi-axes, clipped by
    // the body; lesion 4.5-8 x 4.5-8 x 6-10 mm), as voxel counts of 0.8 * 0.8 * 2.5 = 1.6 mm^3.
    EXPECT_GT(count[1], 1000) << "case " << i;
    EXPECT_GT(count[2], 200) << "case " << i;
    EXPECT_LT(count[2], count[1] + count[2]) << "case " << i;
    // Organ brighter than the lesion on average (the contrast the network has to learn).
    EXPECT_GT(sum[1] / count[1], sum[2] / count[2] + 10) << "case " << i;
  }
}

TEST(Synthetic, WritesAnMsdDatasetThatDiscoveryAccepts) {
  const fs::path dir = fresh_dir("synthetic_msd");
  generate_synthetic_dataset(dir, small(9));
  const io::Dataset ds = io::discover_dataset(dir);
  EXPECT_EQ(ds.layout, "msd");
  ASSERT_EQ(ds.channel_names, std::vector<std::string>({"MRI"}));
  ASSERT_EQ(ds.labels.size(), 3u);
  EXPECT_EQ(ds.labels[1].name, "organ");
  EXPECT_EQ(ds.labels[2].name, "lesion");
  ASSERT_EQ(ds.training.size(), 2u);
  ASSERT_EQ(ds.test.size(), 1u);
  EXPECT_FALSE(ds.test[0].label.empty()) << "labelsTs should be found for the test case";
  const auto j = nlohmann::json::parse(read_file(dir / "dataset.json"));
  EXPECT_EQ(j["numTraining"], 2);
  EXPECT_EQ(j["numTest"], 1);
  // Read back: the voxels and the geometry are those generated.
  const auto c = generate_synthetic_case(small(9), 0);
  const Volume img = io::read_image(dir / "imagesTr" / "synth_001.nii.gz");
  const LabelVolume lab = io::read_labels(dir / "labelsTr" / "synth_001.nii.gz");
  EXPECT_EQ(img.data, c.image.data);
  EXPECT_EQ(lab.data, c.labels.data);
  EXPECT_TRUE(img.geo.same_grid(c.image.geo))
      << img.geo.describe() << " vs " << c.image.geo.describe();
  // Origins are multiples of 1/64 mm, exact in the float32 NIfTI header.
  EXPECT_EQ(img.geo.origin, c.image.geo.origin);
  const auto report = io::validate_dataset(ds, io::ValidationOptions{});
  EXPECT_TRUE(report.ok()) << report.text();
  fs::remove_all(dir);
}

TEST(Synthetic, DatasetFilesAreByteIdenticalForTheSameSeed) {
  // zlib's gzip header carries MTIME 0 when written through gzopen/gzwrite (as ITK's NIfTI IO
  // does), and NIfTI headers hold no timestamps, so whole files must match, not just voxels.
  const fs::path a = fresh_dir("synthetic_a"), b = fresh_dir("synthetic_b");
  generate_synthetic_dataset(a, small(5));
  generate_synthetic_dataset(b, small(5));
  int files = 0;
  for (const auto& e : fs::recursive_directory_iterator(a)) {
    if (!e.is_regular_file()) continue;
    const fs::path rel = fs::relative(e.path(), a);
    ASSERT_TRUE(fs::exists(b / rel)) << rel;
    EXPECT_EQ(read_file(e.path()), read_file(b / rel)) << rel << " differs between two runs";
    ++files;
  }
  EXPECT_EQ(files, 1 + 3 * 2);  // dataset.json + 3 cases x (image, label)
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(Synthetic, RefusesToWriteIntoAnUnrelatedFolder) {
  const fs::path dir = fresh_dir("synthetic_refuse");
  fs::create_directories(dir);
  write_text_file_atomic(dir / "notes.txt", "someone's files\n");
  EXPECT_THROW(generate_synthetic_dataset(dir, small(1)), ArgumentError);
  EXPECT_FALSE(fs::exists(dir / "imagesTr"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace medseg::infer
