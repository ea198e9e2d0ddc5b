// The process group of a data-parallel training run (see docs/architecture.md, "Multi-process training").
//
// world() is the group this process belongs to. When medseg was built with MPI and started by an MPI
// launcher (mpirun / mpiexec sets OMPI_COMM_WORLD_SIZE, PMIX_RANK or PMI_SIZE), it is MPI_COMM_WORLD;
// otherwise it is a group of one and every collective below is a cheap no-op, so single-process code
// paths need no special cases.
//
// Every collective must be called by all ranks in the same order (MPI's rule). Errors of the MPI
// library itself are returned as IoError with the MPI error string.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.hpp"

namespace medseg::dist {

// A failure every rank of the group knows about, raised on all ranks at the same point (a collective
// check failed). app/ reports it once, from rank 0, and every rank exits with `code` (2: invalid input,
// 1: runtime failure) through a clean MPI_Finalize instead of MPI_Abort.
class GroupError : public Error {
 public:
  GroupError(const std::string& message, int code) : Error(message), code_(code) {}
  int code() const { return code_; }

 private:
  int code_;
};

class Comm {
 public:
  // The group of this process; initialises MPI on first use (thread level FUNNELED: only the main
  // thread talks to MPI; the data loader and OpenMP threads never do).
  static Comm& world();

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool root() const { return rank_ == 0; }
  // Processes of this group on this machine (OMPI_COMM_WORLD_LOCAL_SIZE); 1 without MPI.
  int local_size() const { return local_size_; }
  // This process's index among them (OMPI_COMM_WORLD_LOCAL_RANK, else rank mod local size): its GPU.
  int local_rank() const { return local_rank_; }
  bool mpi() const { return mpi_; }

  // In-place elementwise sums over all ranks.
  void allreduce_sum(float* data, size_t n) const;
  void allreduce_sum(double* data, size_t n) const;
  // Copies root's bytes to every rank.
  void broadcast(void* data, size_t bytes, int root = 0) const;
  // Copies root's string (any length) to every rank.
  void broadcast(std::string& s, int root = 0) const;
  void barrier() const;
  // Collective outcome of a phase that each rank ran on its own: every rank passes its error message
  // ("" for success) and gets {-1, ""} when every rank succeeded, otherwise the lowest failing rank
  // and its message.
  struct Failure {
    int rank = -1;
    std::string message;
  };
  Failure first_failure(const std::string& local_error) const;
  // True on every rank when `value` is the same on all ranks.
  bool same_everywhere(uint64_t value) const;

  // Stops every process of the group with this exit code (MPI_Abort); for app/'s error handler, so
  // that a rank that fails alone does not leave the others waiting in a collective.
  [[noreturn]] void abort(int code) const;
  // Ends MPI cleanly (idempotent); app/ calls it before returning from main.
  void finalize();

 private:
  Comm();
  int rank_ = 0, size_ = 1, local_size_ = 1, local_rank_ = 0;
  bool mpi_ = false;
};

// Whether this build can run multi-process (compiled against MPI).
bool built_with_mpi();
// The MPI library version, or "not built with MPI".
std::string mpi_version();

}  // namespace medseg::dist
