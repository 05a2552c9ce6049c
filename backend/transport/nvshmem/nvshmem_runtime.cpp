#include "backend/transport/nvshmem/nvshmem_runtime.hpp"

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>
#include <string>

#include "backend/common/env_switch.hpp"
#include "backend/common/errors.hpp"

namespace ep::nvshmem {
namespace {

std::mutex mutex;
bool registered = false;

std::string status_name(int status) {
  switch (status) {
    case NVSHMEM_STATUS_NOT_INITIALIZED: return "not initialised";
    case NVSHMEM_STATUS_IS_BOOTSTRAPPED: return "bootstrapped only";
    case NVSHMEM_STATUS_IS_INITIALIZED: return "initialised";
    case NVSHMEM_STATUS_LIMITED_MPG: return "limited multi-process-per-GPU";
    case NVSHMEM_STATUS_FULL_MPG: return "full multi-process-per-GPU";
    default: return "status " + std::to_string(status);
  }
}

}  // namespace

int init_status() { return nvshmemx_init_status(); }

void attach(int rank, int size) {
  std::lock_guard<std::mutex> lock(mutex);
  const int status = nvshmemx_init_status();
  if (status < NVSHMEM_STATUS_IS_INITIALIZED)
    throw CommError("torch_ep: NVSHMEM is " + status_name(status) +
                    "; torch_ep.low_latency initialises it through nvshmem4py before the first low-latency call");
  if (status == NVSHMEM_STATUS_LIMITED_MPG)
    throw CommError(
        "torch_ep: NVSHMEM runs in limited multi-process-per-GPU mode (ranks share a GPU without MPS), where its "
        "collectives abort the process. Start the MPS daemon (nvidia-cuda-mps-control -d) and give each of the N "
        "ranks sharing a GPU CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100/N (at most 100 in all)");
  if (!registered) {
    // What the header's nvshmemx_init_attr(0, NULL) does, minus its exit(-1) on failure: the
    // device library's init entry. The host library is past bootstrap and initialisation, so
    // this only registers our nvshmemi_device_state_d and copies the state into it.
    int provided = 0;
    const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                        NVSHMEM_VENDOR_PATCH_VERSION};
    const int err = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, 0, nullptr, version);
    if (err != 0)
      throw CommError("torch_ep: registering torch_ep's NVSHMEM device state failed (nvshmemi_init_thread returned " +
                      std::to_string(err) + "); is the libnvshmem_host.so.3 loaded (" +
                      "the nvidia-nvshmem-cu13 wheel) the one torch_ep was built against?");
    registered = true;
  }
  const int pe = nvshmem_my_pe(), npes = nvshmem_n_pes();
  if (pe != rank || npes != size)
    throw CommError("torch_ep: NVSHMEM was initialised as PE " + std::to_string(pe) + " of " + std::to_string(npes) +
                    ", but this rank is " + std::to_string(rank) + " of a group of " + std::to_string(size) +
                    "; low-latency ops need the NVSHMEM world to be their group (one such group per process)");
}

void default_local_only_env() {
  // Peers by load and store only (no remote transport): NVSHMEM's proxy thread would serve only
  // its device-side global exit and wait timeouts, neither of which torch_ep uses (its waits have
  // deadlines of their own), and it spins a core a rank. Ranks that share a host's cores then
  // lose them for scheduler slices: virtual nodes 2x4 on one 16-core H100 machine, calls after a
  // barrier stalled 3.5 ms at random (all_to_all 2.24x intranode against 1.21x with it off).
  const char* remote = std::getenv("NVSHMEM_REMOTE_TRANSPORT");
  if (remote && std::strcmp(remote, "none") == 0) setenv("NVSHMEM_DISABLE_LOCAL_ONLY_PROXY", "1", /*overwrite=*/0);
}

void init_over(Rendezvous& rdv, int device) {
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (nvshmemx_init_status() < NVSHMEM_STATUS_IS_INITIALIZED) {
      default_local_only_env();
      nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
      if (rdv.rank() == 0) {
        if (nvshmemx_get_uniqueid(&id) != 0) throw CommError("torch_ep: nvshmemx_get_uniqueid failed");
        const auto* p = reinterpret_cast<const uint8_t*>(&id);
        rdv.set("nvshmem/uid", std::vector<uint8_t>(p, p + sizeof(id)));
      } else {
        const auto bytes = rdv.get("nvshmem/uid");
        if (bytes.size() != sizeof(id)) throw CommError("torch_ep: NVSHMEM unique id of the wrong size in the store");
        std::memcpy(&id, bytes.data(), sizeof(id));
      }
      nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
      nvshmemx_set_attr_uniqueid_args(rdv.rank(), rdv.size(), &id, &attr);
      if (cudaSetDevice(device) != cudaSuccess) throw CommError("torch_ep: cudaSetDevice failed before NVSHMEM init");
      // nvshmemx_init_attr without its exit(-1): an error here must raise, not end the process.
      int provided = 0;
      const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                          NVSHMEM_VENDOR_PATCH_VERSION};
      const int err = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr,
                                           version);
      if (err != 0)
        throw CommError("torch_ep: NVSHMEM initialisation failed (nvshmemi_init_thread returned " +
                        std::to_string(err) + "); run with NVSHMEM_DEBUG=INFO to see why (transports: "
                        "docs/internode.md)");
      registered = true;  // this entry also registered torch_ep's device state
    }
  }
  attach(rdv.rank(), rdv.size());
}

bool attached() {
  std::lock_guard<std::mutex> lock(mutex);
  return registered;
}

void* malloc_symmetric(size_t bytes) {
  void* ptr = nvshmem_malloc(bytes);
  if (!ptr)
    throw CommError("torch_ep: nvshmem_malloc(" + std::to_string(bytes) +
                    ") failed: the NVSHMEM symmetric heap is too small. Set NVSHMEM_SYMMETRIC_SIZE (bytes) above "
                    "what the low-latency buffers need before the first low-latency call");
  return ptr;
}

void free_symmetric(void* ptr) {
  if (ptr) nvshmem_free(ptr);
}

void* peer_ptr(void* ptr, int pe) { return nvshmem_ptr(ptr, pe); }

bool whatif_copy_puts() {
  static const bool on = env_switch("TORCH_EP_WHATIF_COPY_PUTS");
  return on;
}

}  // namespace ep::nvshmem
