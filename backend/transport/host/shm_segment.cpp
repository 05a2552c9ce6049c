#include "backend/transport/host/shm_segment.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <utility>

#include "backend/common/errors.hpp"

namespace ep {
namespace {

char* map_fd(int fd, size_t bytes, const std::string& name) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int err = errno;
  close(fd);
  if (p == MAP_FAILED) throw CommError("torch_ep: mmap of shared memory " + name + " failed: " + errno_string(err));
  return static_cast<char*>(p);
}

}  // namespace

// No iostreams: they crashed in this library on one toolchain, and snprintf is all this needs.
std::string ShmSegment::unique_id() {
  static std::atomic<uint64_t> counter{0};
  const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%x_%llx_%llx", unsigned(getpid()), (unsigned long long)now,
                (unsigned long long)counter.fetch_add(1));
  return buf;
}

std::vector<ShmSegment> ShmSegment::map_per_rank(Rendezvous& rdv, const std::string& tag, const std::string& prefix,
                                                 size_t bytes) {
  const int rank = rdv.rank();
  auto name = [&](int r) { return prefix + "_" + std::to_string(r); };
  std::vector<ShmSegment> segments(size_t(rdv.size()));
  // posix_fallocate zero-fills, so counters and flags start at 0.
  ShmSegment& mine = segments[size_t(rank)] = create(name(rank), bytes);
  try {
    rdv.barrier(tag + "/created");
    for (int r = 0; r < rdv.size(); ++r)
      if (r != rank) segments[size_t(r)] = open(name(r), bytes);
    rdv.barrier(tag + "/mapped");
  } catch (...) {
    mine.unlink();
    throw;
  }
  mine.unlink();  // every peer holds a mapping: the name is no longer needed
  return segments;
}

ShmSegment ShmSegment::create(const std::string& name, size_t bytes) {
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) throw CommError("torch_ep: shm_open(" + name + ") failed: " + errno_string(errno));
  // posix_fallocate reserves the pages now, so a full /dev/shm fails here, not with SIGBUS later.
  int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (err != 0) {
    close(fd);
    shm_unlink(name.c_str());
    throw CommError("torch_ep: cannot reserve " + std::to_string(bytes) + " bytes of shared memory for " + name +
                    " (is /dev/shm large enough? lower TORCH_EP_HOST_BUFFER_BYTES): " + errno_string(err));
  }
  ShmSegment seg;
  seg.name_ = name;
  seg.bytes_ = bytes;
  seg.owner_linked_ = true;
  try {
    seg.data_ = map_fd(fd, bytes, name);
  } catch (...) {
    shm_unlink(name.c_str());
    throw;
  }
  return seg;
}

ShmSegment ShmSegment::open(const std::string& name, size_t bytes) {
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) throw CommError("torch_ep: shm_open(" + name + ") of a peer's segment failed: " + errno_string(errno));
  ShmSegment seg;
  seg.name_ = name;
  seg.bytes_ = bytes;
  seg.data_ = map_fd(fd, bytes, name);
  return seg;
}

void ShmSegment::unlink() {
  if (owner_linked_) {
    shm_unlink(name_.c_str());
    owner_linked_ = false;
  }
}

ShmSegment::~ShmSegment() {
  unlink();
  if (data_) munmap(data_, bytes_);
}

ShmSegment::ShmSegment(ShmSegment&& o) noexcept
    : name_(std::move(o.name_)), data_(o.data_), bytes_(o.bytes_), owner_linked_(o.owner_linked_) {
  o.data_ = nullptr;
  o.owner_linked_ = false;
}

ShmSegment& ShmSegment::operator=(ShmSegment&& o) noexcept {
  if (this != &o) {
    this->~ShmSegment();
    new (this) ShmSegment(std::move(o));
  }
  return *this;
}

}  // namespace ep
