// MPI behind medseg::dist::Comm. Without MEDSEG_HAVE_MPI every collective acts on a group of one.
#include "dist/comm.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/error.hpp"

#ifdef MEDSEG_HAVE_MPI
#include <mpi.h>
#endif

namespace medseg::dist {

namespace {

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"})
    if (std::getenv(v)) return true;
  return false;
}

#ifdef MEDSEG_HAVE_MPI
void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw IoError(std::string(what) + " failed: " + std::string(text, static_cast<size_t>(len)));
}
#endif

}  // namespace

Comm& Comm::world() {
  static Comm c;
  return c;
}

Comm::Comm() {
#ifdef MEDSEG_HAVE_MPI
  if (!launched_by_mpi()) return;
  int provided = 0;
  check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  // Collectives return their errors to us (they become IoError) instead of killing the job silently.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  mpi_ = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  if (const char* l = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) local_size_ = std::max(1, std::atoi(l));
  else local_size_ = size_;
  if (const char* l = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) local_rank_ = std::max(0, std::atoi(l));
  else local_rank_ = rank_ % local_size_;
#else
  if (launched_by_mpi() && std::getenv("OMPI_COMM_WORLD_SIZE") &&
      std::atoi(std::getenv("OMPI_COMM_WORLD_SIZE")) > 1)
    throw ArgumentError("started by mpirun with several processes, but this medseg was built without "
                        "MPI (install libopenmpi-dev and rebuild); each process would train alone");
#endif
}

namespace {
// In-place MPI_SUM over MPI_COMM_WORLD of n floats or doubles.
void allreduce_in_place(int group_size, void* data, size_t n, bool doubles) {
  if (group_size == 1 || n == 0) return;
#ifdef MEDSEG_HAVE_MPI
  check(MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(n), doubles ? MPI_DOUBLE : MPI_FLOAT, MPI_SUM,
                      MPI_COMM_WORLD),
        doubles ? "MPI_Allreduce (double sum)" : "MPI_Allreduce (float sum)");
#else
  (void)data;
  (void)doubles;
#endif
}
}  // namespace

void Comm::allreduce_sum(float* data, size_t n) const { allreduce_in_place(size_, data, n, false); }

void Comm::allreduce_sum(double* data, size_t n) const { allreduce_in_place(size_, data, n, true); }

void Comm::broadcast(void* data, size_t bytes, int root) const {
  if (size_ == 1 || bytes == 0) return;
#ifdef MEDSEG_HAVE_MPI
  // MPI counts are int: send large buffers in chunks.
  constexpr size_t chunk = size_t{1} << 30;
  auto* p = static_cast<char*>(data);
  for (size_t off = 0; off < bytes; off += chunk)
    check(MPI_Bcast(p + off, static_cast<int>(std::min(chunk, bytes - off)), MPI_BYTE, root, MPI_COMM_WORLD),
          "MPI_Bcast");
#else
  (void)data;
  (void)root;
#endif
}

void Comm::broadcast(std::string& s, int root) const {
  if (size_ == 1) return;
  uint64_t n = s.size();
  broadcast(&n, sizeof n, root);
  s.resize(n);
  broadcast(s.data(), n, root);
}

void Comm::barrier() const {
#ifdef MEDSEG_HAVE_MPI
  if (size_ > 1) check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
#endif
}

Comm::Failure Comm::first_failure(const std::string& local_error) const {
  if (size_ == 1) return local_error.empty() ? Failure{} : Failure{0, local_error};
  // The lowest failing rank (size_ when none failed), then its message.
  std::vector<double> all(static_cast<size_t>(size_), 0.0);
  all[static_cast<size_t>(rank_)] = local_error.empty() ? 0.0 : 1.0;
  allreduce_sum(all.data(), all.size());
  int failing = -1;
  for (int r = 0; r < size_ && failing < 0; ++r)
    if (all[static_cast<size_t>(r)] != 0) failing = r;
  if (failing < 0) return {};
  std::string msg = local_error;
  broadcast(msg, failing);
  return {failing, msg};
}

bool Comm::same_everywhere(uint64_t value) const {
  if (size_ == 1) return true;
  uint64_t root_value = value;
  broadcast(&root_value, sizeof root_value, 0);
  double differs = root_value == value ? 0.0 : 1.0;
  allreduce_sum(&differs, 1);
  return differs == 0;
}

void Comm::abort(int code) const {
#ifdef MEDSEG_HAVE_MPI
  if (mpi_) MPI_Abort(MPI_COMM_WORLD, code);
#endif
  std::exit(code);
}

void Comm::finalize() {
#ifdef MEDSEG_HAVE_MPI
  int done = 0;
  if (mpi_ && MPI_Finalized(&done) == MPI_SUCCESS && !done) MPI_Finalize();
#endif
}

bool built_with_mpi() {
#ifdef MEDSEG_HAVE_MPI
  return true;
#else
  return false;
#endif
}

std::string mpi_version() {
#ifdef MEDSEG_HAVE_MPI
  char v[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(v, &len);
  std::string s(v, static_cast<size_t>(len));
  if (auto nl = s.find_first_of("\n,"); nl != std::string::npos) s.resize(nl);
  return s;
#else
  return "not built with MPI";
#endif
}

}  // namespace medseg::dist
