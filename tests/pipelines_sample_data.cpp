// The committed sample_data/ is exactly what `medseg sample-data --cases 16 --seed 1` writes.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/atomic_file.hpp"
#include "core/log.hpp"
#include "pipelines/sample_data.hpp"

namespace fs = std::filesystem;

TEST(SampleData, CommittedFilesAreReproducedByteForByte) {
  const fs::path committed = fs::path(MEDSEG_SOURCE_DIR) / "sample_data";
  ASSERT_TRUE(fs::exists(committed / "dataset.json")) << committed;
  const fs::path fresh = fs::temp_directory_path() / ("medseg_sample_" + std::to_string(::getpid()));
  fs::remove_all(fresh);
  medseg::set_log_level(medseg::LogLevel::Warn);
  medseg::pipelines::SampleDataConfig c;
  c.out = fresh;
  c.cases = 16;
  c.seed = 1;
  ASSERT_EQ(medseg::pipelines::run_sample_data(c), 0);
  int compared = 0;
  for (const auto& e : fs::recursive_directory_iterator(fresh)) {
    if (!e.is_regular_file()) continue;
    const fs::path rel = fs::relative(e.path(), fresh);
    ASSERT_TRUE(fs::exists(committed / rel)) << rel << " is generated but not committed";
    EXPECT_TRUE(medseg::read_file(e.path()) == medseg::read_file(committed / rel)) << rel << " differs";
    ++compared;
  }
  EXPECT_EQ(compared, 1 + 2 * 16 + 2 * 4);  // dataset.json, 16 training and 4 test image/label pairs
  fs::remove_all(fresh);
}
