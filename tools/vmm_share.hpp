// Arenas of the CUDA virtual memory API (cuMemCreate), mapped by every forked rank of a probe
// (tools/forked_ranks.hpp): the alternative to a cudaMalloc'd arena mapped by CUDA IPC
// (cudaIpcOpenMemHandle), as torch's symmetric memory maps its buffers. Whether a peer's arena
// mapped this way copies faster than through an IPC mapping is what tools/pool_copy_probe.cu's
// "vmm" rows measure (issue 16: on the H200 the pool's move through IPC mappings ran far from the
// local copy's rate).
//
// Each rank exports its allocation as a POSIX file descriptor and sends it to every other rank
// over a datagram socket pair made before the fork (SCM_RIGHTS). The driver's functions come
// through the runtime's entry points, so the probe needs no libcuda at link time.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "backend/transport/cuda/driver_entry_point.hpp"

namespace vmm {

struct Driver {
  PFN_cuMemGetAllocationGranularity_v10020 granularity = nullptr;
  PFN_cuMemCreate_v10020 create = nullptr;
  PFN_cuMemAddressReserve_v10020 reserve = nullptr;
  PFN_cuMemMap_v10020 map = nullptr;
  PFN_cuMemSetAccess_v10020 set_access = nullptr;
  PFN_cuMemExportToShareableHandle_v10020 export_handle = nullptr;
  PFN_cuMemImportFromShareableHandle_v10020 import_handle = nullptr;
};

inline bool load(Driver& d) {
  constexpr unsigned kAbi = 10020;  // every function here is of the 10.2 ABI (PFN_*_v10020)
  return ep::driver_entry_point("cuMemGetAllocationGranularity", kAbi, &d.granularity) &&
         ep::driver_entry_point("cuMemCreate", kAbi, &d.create) &&
         ep::driver_entry_point("cuMemAddressReserve", kAbi, &d.reserve) &&
         ep::driver_entry_point("cuMemMap", kAbi, &d.map) &&
         ep::driver_entry_point("cuMemSetAccess", kAbi, &d.set_access) &&
         ep::driver_entry_point("cuMemExportToShareableHandle", kAbi, &d.export_handle) &&
         ep::driver_entry_point("cuMemImportFromShareableHandle", kAbi, &d.import_handle);
}

// One datagram socket pair per rank, made before the fork: rank r reads from pair[r][1], every
// other rank writes to pair[r][0].
using Pairs = std::vector<std::array<int, 2>>;
inline bool make_pairs(int ranks, Pairs& pairs) {
  pairs.assign(ranks, {-1, -1});
  for (auto& p : pairs)
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, p.data()) != 0) return false;
  return true;
}

inline bool send_fd(int socket, int from, int fd) {
  char control[CMSG_SPACE(sizeof(int))] = {};
  iovec io{&from, sizeof(from)};
  msghdr msg{};
  msg.msg_iov = &io;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  return sendmsg(socket, &msg, 0) == ssize_t(sizeof(from));
}

inline bool receive_fd(int socket, int* from, int* fd) {
  char control[CMSG_SPACE(sizeof(int))] = {};
  iovec io{from, sizeof(*from)};
  msghdr msg{};
  msg.msg_iov = &io;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  if (recvmsg(socket, &msg, 0) != ssize_t(sizeof(*from))) return false;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  if (!c || c->cmsg_type != SCM_RIGHTS) return false;
  std::memcpy(fd, CMSG_DATA(c), sizeof(int));
  return true;
}

// Maps `handle` (size bytes, a multiple of the granularity) read-write on device 0.
inline std::string map(const Driver& d, CUmemGenericAllocationHandle handle, size_t size, size_t granularity,
                       char** at) {
  CUdeviceptr va = 0;
  if (d.reserve(&va, size, granularity, 0, 0) != CUDA_SUCCESS) return "cuMemAddressReserve";
  if (d.map(va, size, 0, handle, 0) != CUDA_SUCCESS) return "cuMemMap";
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = 0;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  if (d.set_access(va, size, &access, 1) != CUDA_SUCCESS) return "cuMemSetAccess";
  *at = reinterpret_cast<char*>(va);
  return "";
}

// This rank's arena of `bytes` (at[me]) and every peer's as mapped here (at[r]); "" or what failed.
// Every rank must call it (each waits for the others' descriptors).
inline std::string share_arenas(const Pairs& pairs, int me, uint64_t bytes, std::vector<char*>& at) {
  const int ranks = int(pairs.size());
  at.assign(ranks, nullptr);
  // Whatever fails here, the rank still sends every peer a message (a failure's marker in place
  // of its rank), so that no peer waits for ever.
  std::string failed;
  Driver d;
  if (!load(d)) failed = "the driver's cuMem* entry points";
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = 0;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  size_t granularity = 0;
  if (failed.empty() && d.granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) != CUDA_SUCCESS)
    failed = "cuMemGetAllocationGranularity";
  const size_t size = granularity ? (bytes + granularity - 1) / granularity * granularity : 0;
  CUmemGenericAllocationHandle mine{};
  int fd = -1;
  if (failed.empty() && d.create(&mine, size, &prop, 0) != CUDA_SUCCESS) failed = "cuMemCreate";
  if (failed.empty()) failed = map(d, mine, size, granularity, &at[me]);
  if (failed.empty() && d.export_handle(&fd, mine, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0) != CUDA_SUCCESS)
    failed = "cuMemExportToShareableHandle";
  bool sent = true;
  for (int r = 0; r < ranks; ++r)
    if (r != me) sent = send_fd(pairs[r][0], failed.empty() ? me : -1 - me, failed.empty() ? fd : 0) && sent;
  if (!sent && failed.empty()) failed = "sendmsg";
  for (int k = 1; k < ranks; ++k) {
    int from = 0, theirs = -1;
    if (!receive_fd(pairs[me][1], &from, &theirs)) return "recvmsg";
    if (from < 0) {
      if (failed.empty()) failed = "rank " + std::to_string(-1 - from) + "'s arena";
      close(theirs);
      continue;
    }
    CUmemGenericAllocationHandle handle{};
    void* os_handle = reinterpret_cast<void*>(uintptr_t(theirs));
    if (failed.empty() && d.import_handle(&handle, os_handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) != CUDA_SUCCESS)
      failed = "cuMemImportFromShareableHandle";
    if (failed.empty()) failed = map(d, handle, size, granularity, &at[from]);
    close(theirs);
  }
  if (fd >= 0) close(fd);
  return failed;
}

}  // namespace vmm
