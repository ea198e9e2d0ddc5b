// Batch building and the background loader. Workers claim batch indices in order from a window of
// queue_capacity indices past the one the trainer takes next, build them without holding the lock,
// and park them in an index-keyed map; next() takes exactly the next index, so the order in which
// workers finish never shows.
#include "data/loader.hpp"

#include "core/error.hpp"

namespace medseg::data {
namespace {

// Rethrows the exception being handled as the same medseg type, its message prefixed with
// `context`.
[[noreturn]] void rethrow_with_context(const std::string& context) {
  try {
    throw;
  } catch (const IoError& e) {
    throw IoError(context + e.what());
  } catch (const ArgumentError& e) {
    throw ArgumentError(context + e.what());
  } catch (const NumericError& e) {
    throw NumericError(context + e.what());
  } catch (const CudaError& e) {
    throw CudaError(context + e.what());
  } catch (const Error& e) {
    throw Error(context + e.what());
  }
  // Any other type propagates from `throw;` unchanged.
}

void check_batch_arguments(const std::vector<CaseView>& cases, const SamplerConfig& sampler,
                           int batch_size) {
  MEDSEG_CHECK(!cases.empty(), "no training cases to sample from");
  MEDSEG_CHECK(batch_size >= 1, "batch size must be at least 1, got ", batch_size);
  MEDSEG_CHECK(sampler.patch[0] > 0 && sampler.patch[1] > 0 && sampler.patch[2] > 0,
               "patch size must be positive, got (", sampler.patch[0], ", ", sampler.patch[1], ", ",
               sampler.patch[2], ")");
  MEDSEG_CHECK(cases[0].channels >= 1, "case '", cases[0].id, "' has ", cases[0].channels,
               " channels");
}

}  // namespace

Batch make_batch(const std::vector<CaseView>& cases, const SamplerConfig& sampler,
                 const AugmentConfig& augment, int batch_size, uint64_t seed,
                 uint64_t batch_index) {
  check_batch_arguments(cases, sampler, batch_size);
  const int channels = cases[0].channels;
  const auto& p = sampler.patch;
  const int64_t voxels = p[0] * p[1] * p[2];

  Rng rng = Rng(seed).split(batch_index);
  const std::vector<bool> forced =
      forced_foreground_plan(batch_size, sampler.foreground_fraction, rng);
  std::vector<size_t> pick(static_cast<size_t>(batch_size));
  for (auto& k : pick) k = static_cast<size_t>(rng.below(cases.size()));

  Batch batch;
  batch.index = batch_index;
  batch.image = Tensor(Shape{batch_size, p[0], p[1], p[2], channels});
  batch.labels.resize(static_cast<size_t>(batch_size * voxels));
  for (int i = 0; i < batch_size; ++i) {
    const CaseView& cs = cases[pick[static_cast<size_t>(i)]];
    batch.case_ids.push_back(cs.id);
    try {
      MEDSEG_CHECK(cs.channels == channels, "case '", cs.id, "' has ", cs.channels,
                   " channels, the batch has ", channels);
      Rng sample_rng = rng.split(static_cast<uint64_t>(i));
      float* image = batch.image.data() + i * voxels * channels;
      sample_augmented_patch(cs, sampler, augment, forced[static_cast<size_t>(i)], sample_rng,
                             image, batch.labels.data() + i * voxels);
      augment_intensity(augment, sample_rng, image, p, channels);
    } catch (...) {
      rethrow_with_context("case '" + cs.id + "' (batch " + std::to_string(batch_index) +
                           ", sample " + std::to_string(i) + "): ");
    }
  }
  return batch;
}

BatchLoader::BatchLoader(std::vector<CaseView> cases, SamplerConfig sampler, AugmentConfig augment,
                         int batch_size, int workers, uint64_t seed, size_t queue_capacity,
                         uint64_t first_batch_index)
    : cases_(std::move(cases)),
      sampler_(sampler),
      augment_(augment),
      batch_size_(batch_size),
      seed_(seed),
      capacity_(queue_capacity),
      next_claim_(first_batch_index),
      next_out_(first_batch_index) {
  check_batch_arguments(cases_, sampler_, batch_size_);
  MEDSEG_CHECK(workers >= 1, "the loader needs at least 1 worker, got ", workers);
  MEDSEG_CHECK(queue_capacity >= 1, "queue capacity must be at least 1, got ", queue_capacity);
  for (const CaseView& cs : cases_)
    MEDSEG_CHECK(cs.channels == cases_[0].channels, "case '", cs.id, "' has ", cs.channels,
                 " channels, case '", cases_[0].id, "' has ", cases_[0].channels);
  try {
    for (int w = 0; w < workers; ++w) threads_.emplace_back([this] { worker_loop(); });
  } catch (...) {
    stop();
    throw;
  }
}

BatchLoader::~BatchLoader() {
  stop();
}

void BatchLoader::worker_loop() {
  for (;;) {
    uint64_t index = 0;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [this] { return stopping_ || next_claim_ < next_out_ + capacity_; });
      if (stopping_) return;
      index = next_claim_++;
    }
    Slot slot;
    try {
      slot.batch = make_batch(cases_, sampler_, augment_, batch_size_, seed_, index);
    } catch (...) {
      slot.error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ready_.emplace(index, std::move(slot));
    }
    changed_.notify_all();
  }
}

Batch BatchLoader::next() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [this] { return stopping_ || ready_.count(next_out_) > 0; });
  if (stopping_) throw ArgumentError("BatchLoader::next() called after stop()");
  auto it = ready_.find(next_out_);
  if (it->second.error) std::rethrow_exception(it->second.error);
  Batch batch = std::move(it->second.batch);
  ready_.erase(it);
  ++next_out_;
  lock.unlock();
  changed_.notify_all();
  return batch;
}

void BatchLoader::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
}

uint64_t BatchLoader::next_batch_index() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return next_out_;
}

size_t BatchLoader::buffered() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ready_.size();
}

}  // namespace medseg::data
