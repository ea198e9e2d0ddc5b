// The background loader: reproducible batch sequences for any worker count, exact resume, errors
// carried to the trainer's thread, and a clean stop even with a full queue.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <thread>

#include "core/error.hpp"
#include "data/loader.hpp"
#include "support/synthetic_case.hpp"

using namespace medseg;
using namespace medseg::data;
using medseg::test::in_box;
using medseg::test::make_case;

namespace {

std::vector<test::OwnedCase> make_cases() {
  std::vector<test::OwnedCase> cases;
  for (int k = 0; k < 3; ++k) {
    const std::array<int64_t, 3> shape{20 + 2 * k, 24, 22 + k};
    const std::array<int64_t, 3> lo{4 + k, 6, 5}, hi{9 + k, 12, 11};
    cases.push_back(make_case(
        "case_" + std::to_string(k), shape, 2,
        [=](int64_t z, int64_t y, int64_t x, int c) {
          return static_cast<float>(std::cos(0.2 * z * (k + 1)) + 0.03 * y * x - c);
        },
        [=](int64_t z, int64_t y, int64_t x) {
          return in_box(z, y, x, lo, hi) ? static_cast<uint16_t>(1 + (x % 2)) : uint16_t{0};
        }));
  }
  return cases;
}

std::vector<CaseView> views(const std::vector<test::OwnedCase>& owned) {
  std::vector<CaseView> v;
  for (const auto& c : owned) v.push_back(c.view());
  return v;
}

SamplerConfig small_patch() {
  SamplerConfig s;
  s.patch = {12, 16, 16};
  return s;
}

// Everything on, with the spatial probabilities raised so the interpolating path is exercised
// often.
AugmentConfig busy_augment() {
  AugmentConfig a;
  a.p_rotation = 0.5;
  a.p_scaling = 0.5;
  a.p_noise = 0.5;
  return a;
}

void expect_same_batch(const Batch& a, const Batch& b, const std::string& what) {
  ASSERT_EQ(a.index, b.index) << what;
  ASSERT_EQ(a.image.shape(), b.image.shape()) << what;
  ASSERT_EQ(a.case_ids, b.case_ids) << what;
  ASSERT_EQ(a.labels, b.labels) << what << " batch " << a.index;
  for (int64_t i = 0; i < a.image.numel(); ++i)
    ASSERT_EQ(a.image.data()[i], b.image.data()[i])
        << what << " batch " << a.index << " value " << i;
}

// Runs `f` with a deadline; a hang fails the test and ends the process (a hung thread cannot be
// joined, and the test binary must not hang CI).
template <typename F>
void within_seconds(int seconds, const char* what, F f) {
  auto done = std::make_shared<std::promise<void>>();
  std::future<void> fut = done->get_future();
  std::thread t([done, f]() mutable {
    f();
    done->set_value();
  });
  if (fut.wait_for(std::chrono::seconds(seconds)) != std::future_status::ready) {
    ADD_FAILURE() << what << " did not finish within " << seconds << " s";
    std::fprintf(stderr, "%s hangs: aborting the test binary\n", what);
    std::fflush(stderr);
    std::_Exit(1);
  }
  t.join();
}

}  // namespace

TEST(Loader, SameSeedGivesIdenticalBatchesForOneOrTwoWorkers) {
  const auto owned = make_cases();
  const auto cases = views(owned);
  const int count = 8;
  std::vector<Batch> one, two;
  {
    BatchLoader loader(cases, small_patch(), busy_augment(), 2, 1, 1234);
    for (int i = 0; i < count; ++i) one.push_back(loader.next());
  }
  {
    BatchLoader loader(cases, small_patch(), busy_augment(), 2, 2, 1234, 3);
    for (int i = 0; i < count; ++i) two.push_back(loader.next());
  }
  for (int i = 0; i < count; ++i) {
    ASSERT_EQ(one[static_cast<size_t>(i)].index, static_cast<uint64_t>(i));
    expect_same_batch(one[static_cast<size_t>(i)], two[static_cast<size_t>(i)], "1 vs 2 workers");
    const Batch direct =
        make_batch(cases, small_patch(), busy_augment(), 2, 1234, static_cast<uint64_t>(i));
    expect_same_batch(one[static_cast<size_t>(i)], direct, "loader vs make_batch");
  }
  // Another seed gives other batches, and consecutive batches differ.
  const Batch other = make_batch(cases, small_patch(), busy_augment(), 2, 1235, 0);
  EXPECT_NE(other.labels == one[0].labels && other.case_ids == one[0].case_ids &&
                other.image.to_vector() == one[0].image.to_vector(),
            true);
  EXPECT_NE(one[0].image.to_vector(), one[1].image.to_vector());
  EXPECT_EQ(one[0].image.shape(), (Shape{2, 12, 16, 16, 2}));
  EXPECT_EQ(one[0].labels.size(), static_cast<size_t>(2 * 12 * 16 * 16));
}

TEST(Loader, ResumesExactlyFromTheSavedIndex) {
  const auto owned = make_cases();
  const auto cases = views(owned);
  std::vector<Batch> first;
  uint64_t saved = 0;
  {
    BatchLoader loader(cases, small_patch(), busy_augment(), 2, 2, 77);
    for (int i = 0; i < 5; ++i) first.push_back(loader.next());
    saved = loader.next_batch_index();
  }
  EXPECT_EQ(saved, 5u);
  BatchLoader resumed(cases, small_patch(), busy_augment(), 2, 1, 77, 4, saved);
  EXPECT_EQ(resumed.next_batch_index(), 5u);
  const Batch b = resumed.next();
  expect_same_batch(b, make_batch(cases, small_patch(), busy_augment(), 2, 77, 5), "resumed");
  EXPECT_EQ(resumed.next_batch_index(), 6u);
}

TEST(Loader, WorkerExceptionSurfacesWithTheCaseId) {
  auto owned = make_cases();
  owned.resize(1);
  owned[0].id = "broken_case_17";
  std::vector<CaseView> cases = views(owned);
  cases[0].image = nullptr;  // the sampler rejects it in the worker thread
  BatchLoader loader(cases, small_patch(), AugmentConfig(), 2, 2, 1);
  for (int attempt = 0; attempt < 2; ++attempt) {  // the failed batch is not skipped
    try {
      loader.next();
      FAIL() << "no exception";
    } catch (const ArgumentError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("broken_case_17"), std::string::npos) << m;
      EXPECT_NE(m.find("has no image"), std::string::npos) << m;
      EXPECT_NE(m.find("batch 0"), std::string::npos) << m;
    }
  }
  EXPECT_EQ(loader.next_batch_index(), 0u);
}

TEST(Loader, ErrorKeepsItsTypeInTheSynchronousBuilder) {
  auto owned = make_cases();
  owned[1].locations = {{}, {{0, 0, 999}}};  // a location outside the case
  owned[1].id = "case_bad_locations";
  std::vector<test::OwnedCase> only_bad;
  only_bad.push_back(std::move(owned[1]));
  const auto cases = views(only_bad);
  SamplerConfig s = small_patch();
  s.foreground_fraction = 1.0;
  try {
    make_batch(cases, s, AugmentConfig::none(), 1, 3, 0);
    FAIL() << "no exception";
  } catch (const ArgumentError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("case 'case_bad_locations' (batch 0, sample 0)"), std::string::npos) << m;
  }
}

TEST(Loader, StopWithAFullQueueDoesNotHang) {
  const auto owned = make_cases();
  const auto cases = views(owned);
  auto loader = std::make_unique<BatchLoader>(cases, small_patch(), busy_augment(), 2, 2, 5, 2);
  // Wait (bounded) until the queue is full, so both workers are blocked on it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (loader->buffered() < 2 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(loader->buffered(), 2u) << "the queue never filled";
  within_seconds(20, "BatchLoader::stop", [&] { loader->stop(); });
  EXPECT_THROW(loader->next(), ArgumentError);  // stopped
  within_seconds(20, "BatchLoader::~BatchLoader after stop", [&] { loader.reset(); });

  // The destructor alone, also with a full queue.
  auto second = std::make_unique<BatchLoader>(cases, small_patch(), busy_augment(), 2, 2, 5, 1);
  second->next();
  while (second->buffered() < 1 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  within_seconds(20, "BatchLoader::~BatchLoader", [&] { second.reset(); });
}

TEST(Loader, RejectsBadArguments) {
  const auto owned = make_cases();
  const auto cases = views(owned);
  EXPECT_THROW(BatchLoader({}, small_patch(), AugmentConfig(), 2, 1, 0), ArgumentError);
  EXPECT_THROW(BatchLoader(cases, small_patch(), AugmentConfig(), 0, 1, 0), ArgumentError);
  EXPECT_THROW(BatchLoader(cases, small_patch(), AugmentConfig(), 2, 0, 0), ArgumentError);
  EXPECT_THROW(BatchLoader(cases, small_patch(), AugmentConfig(), 2, 1, 0, 0), ArgumentError);
  EXPECT_THROW(BatchLoader(cases, SamplerConfig{}, AugmentConfig(), 2, 1, 0), ArgumentError);
  auto mixed = cases;
  mixed[2].channels = 1;
  try {
    BatchLoader loader(mixed, small_patch(), AugmentConfig(), 2, 1, 0);
    FAIL() << "no throw";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("case_2"), std::string::npos) << e.what();
  }
}
