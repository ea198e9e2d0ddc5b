// Training batches: a synchronous builder (make_batch) and a background loader whose worker threads
// run it ahead of the trainer.
//
// Reproducibility: batch k is a pure function of (cases, configs, batch size, seed, k); its random
// stream is Rng(seed).split(k). The loader hands batches out in index order whatever the number of
// workers, so a run is reproducible with 1 or 8 workers, and resuming needs only the next batch
// index.
//
// No OpenMP here: each worker is one thread building one batch; the trainer's OpenMP threads own
// the network's arithmetic.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/tensor.hpp"
#include "data/augment.hpp"
#include "data/case_view.hpp"
#include "data/sampler.hpp"

namespace medseg::data {

struct Batch {
  Tensor image;                       // (N, D, H, W, C)
  std::vector<uint16_t> labels;       // N * D * H * W, same voxel order
  std::vector<std::string> case_ids;  // which case each sample came from (diagnostics)
  uint64_t index = 0;                 // the batch index it was built for
};

// Builds batch `batch_index`: with rng = Rng(seed).split(batch_index), the forced-foreground plan
// (forced_foreground_plan), then one uniformly drawn case per sample, then per sample i
// rng.split(i) drives sample_augmented_patch and augment_intensity. All cases must have the same
// channel count. An error while building a sample is rethrown as the same medseg exception type
// (IoError, ArgumentError, NumericError, CudaError, Error) with "case '<id>' (batch k, sample i): "
// in front of its message; other exception types pass through unchanged.
Batch make_batch(const std::vector<CaseView>& cases, const SamplerConfig& sampler,
                 const AugmentConfig& augment, int batch_size, uint64_t seed, uint64_t batch_index);

class BatchLoader {
 public:
  // Starts `workers` threads that build batches first_batch_index, first_batch_index + 1, ...; at
  // most queue_capacity batches are built (or being built) ahead of the one next() returns next.
  // The cases' voxel memory must outlive the loader. Throws ArgumentError for no cases, batch_size,
  // workers or queue_capacity < 1, a patch size < 1, or cases whose channel counts differ.
  BatchLoader(std::vector<CaseView> cases, SamplerConfig sampler, AugmentConfig augment,
              int batch_size, int workers, uint64_t seed, size_t queue_capacity = 4,
              uint64_t first_batch_index = 0);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  // The next batch in index order (one consumer thread); blocks until it is built. If building it failed, rethrows that
  // error (see make_batch) - and keeps rethrowing it on later calls: a batch is never skipped, so a
  // run cannot silently diverge from its reproducible sequence. Throws ArgumentError after stop().
  Batch next();

  // Stops and joins the workers (a worker building a batch finishes that batch first). Idempotent.
  void stop();

  // The index of the batch next() returns next: the loader's whole state, for exact resume (pass it
  // as first_batch_index).
  uint64_t next_batch_index() const;

  // Built batches waiting to be taken (at most queue_capacity): 0 most of the time means the
  // trainer is waiting on the loader.
  size_t buffered() const;

 private:
  struct Slot {
    Batch batch;
    std::exception_ptr error;
  };
  void worker_loop();

  std::vector<CaseView> cases_;
  SamplerConfig sampler_;
  AugmentConfig augment_;
  int batch_size_;
  uint64_t seed_;
  size_t capacity_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;  // a slot filled, a batch taken, or stopping
  std::map<uint64_t, Slot> ready_;   // built batches not yet handed out, by index
  uint64_t next_claim_;              // the next index a worker will build
  uint64_t next_out_;                // the next index next() returns
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace medseg::data
