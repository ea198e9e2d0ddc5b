#include "dist/nccl.hpp"

#ifdef MEDSEG_HAVE_NCCL
#include <dlfcn.h>
#include <nccl.h>

#include <cstdio>
#include <mutex>
#endif

namespace medseg::dist {

#ifdef MEDSEG_HAVE_NCCL
namespace {
// The entry points we use, resolved from libnccl.so.2.
struct NcclApi {
  bool ok = false;
  std::string error;
  ncclResult_t (*get_version)(int*) = nullptr;
  ncclResult_t (*get_unique_id)(ncclUniqueId*) = nullptr;
  ncclResult_t (*comm_init_rank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*comm_destroy)(ncclComm_t) = nullptr;
  ncclResult_t (*all_reduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
                             cudaStream_t) = nullptr;
  ncclResult_t (*group_start)() = nullptr;
  ncclResult_t (*group_end)() = nullptr;
  const char* (*error_string)(ncclResult_t) = nullptr;
};

template <typename F>
void resolve(void* lib, const char* name, F& fn, std::string& error) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn && error.empty()) error = std::string("libnccl.so.2 has no symbol ") + name;
}

const NcclApi& api() {
  static NcclApi a;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* e = dlerror();
      a.error = std::string("cannot load libnccl.so.2: ") + (e ? e : "unknown error");
      return;
    }
    resolve(lib, "ncclGetVersion", a.get_version, a.error);
    resolve(lib, "ncclGetUniqueId", a.get_unique_id, a.error);
    resolve(lib, "ncclCommInitRank", a.comm_init_rank, a.error);
    resolve(lib, "ncclCommDestroy", a.comm_destroy, a.error);
    resolve(lib, "ncclAllReduce", a.all_reduce, a.error);
    resolve(lib, "ncclGroupStart", a.group_start, a.error);
    resolve(lib, "ncclGroupEnd", a.group_end, a.error);
    resolve(lib, "ncclGetErrorString", a.error_string, a.error);
    // ncclAvg (the gradient average) exists from NCCL 2.10 on; the library found at run time may be
    // older than the header medseg was built with.
    int version = 0;
    if (a.error.empty() && (a.get_version(&version) != ncclSuccess || version < 21000))
      a.error = "libnccl.so.2 is version " + std::to_string(version / 10000) + "." +
                std::to_string(version / 100 % 100) + "; medseg needs NCCL >= 2.10 (ncclAvg)";
    a.ok = a.error.empty();
  });
  return a;
}

void check(ncclResult_t r, const char* call) {
  if (r == ncclSuccess) return;
  throw IoError(std::string("NCCL: ") + call + " failed: " + api().error_string(r));
}
}  // namespace

bool nccl_compiled() { return true; }

bool nccl_loadable(std::string* why) {
  const auto& a = api();
  if (!a.ok && why) *why = a.error;
  return a.ok;
}

std::string nccl_version() {
  std::string why;
  if (!nccl_loadable(&why)) return why;
  int v = 0;
  check(api().get_version(&v), "ncclGetVersion");
  // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

NcclComm::NcclComm(const Comm& comm) {
  std::string why;
  if (!nccl_loadable(&why)) throw IoError(why);
  // Rank 0's id travels with its success: if ncclGetUniqueId fails there (e.g. no usable network
  // interface), every rank learns it from the broadcast and throws, so all of them meet again in
  // the caller's agreement step instead of waiting in a broadcast rank 0 never joins.
  struct Bootstrap {
    ncclUniqueId id;
    int ok;
    char error[240];
  } b{};
  if (comm.root()) {
    const ncclResult_t r = api().get_unique_id(&b.id);
    b.ok = r == ncclSuccess;
    if (!b.ok) std::snprintf(b.error, sizeof b.error, "%s", api().error_string(r));
  }
  comm.broadcast(&b, sizeof b, 0);
  if (!b.ok) throw IoError(std::string("NCCL: ncclGetUniqueId failed on rank 0: ") + b.error);
  ncclComm_t c = nullptr;
  check(api().comm_init_rank(&c, comm.size(), b.id, comm.rank()), "ncclCommInitRank");
  comm_ = c;
}

NcclComm::~NcclComm() {
  if (comm_) api().comm_destroy(static_cast<ncclComm_t>(comm_));  // errors at teardown are ignored
}

void NcclComm::allreduce_average(float* device_data, size_t n, void* stream) {
  if (n == 0) return;
  check(api().all_reduce(device_data, device_data, n, ncclFloat32, ncclAvg, static_cast<ncclComm_t>(comm_),
                         static_cast<cudaStream_t>(stream)),
        "ncclAllReduce");
}

void NcclComm::group_start() { check(api().group_start(), "ncclGroupStart"); }
void NcclComm::group_end() { check(api().group_end(), "ncclGroupEnd"); }

#else  // built without NCCL

bool nccl_compiled() { return false; }
bool nccl_loadable(std::string* why) {
  if (why) *why = "medseg was built without NCCL (nccl.h not found next to CUDA, or no CUDA/MPI)";
  return false;
}
std::string nccl_version() { return "not built with NCCL"; }
NcclComm::NcclComm(const Comm&) { throw IoError("medseg was built without NCCL"); }
NcclComm::~NcclComm() = default;
void NcclComm::allreduce_average(float*, size_t, void*) {}
void NcclComm::group_start() {}
void NcclComm::group_end() {}

#endif

}  // namespace medseg::dist
