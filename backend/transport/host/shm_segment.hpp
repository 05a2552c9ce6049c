// A POSIX shared-memory segment mapped into this process. The creator unlinks its name as soon
// as every peer has mapped it (HostTransport does that after a barrier), so nothing is left in
// /dev/shm even if a process is killed later: the memory goes with the last mapping.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "backend/transport/rendezvous.hpp"

namespace ep {

class ShmSegment {
 public:
  ShmSegment() = default;
  static ShmSegment create(const std::string& name, size_t bytes);
  static ShmSegment open(const std::string& name, size_t bytes);
  // A name part no other group on this host uses: pid, time and a counter.
  static std::string unique_id();
  // Collective over the ranks of `rdv`: each rank creates "<prefix>_<rank>" of `bytes` (zeroed),
  // then maps every peer's; the names are unlinked once every rank holds its mappings. Indexed by rank.
  static std::vector<ShmSegment> map_per_rank(Rendezvous& rdv, const std::string& tag, const std::string& prefix,
                                              size_t bytes);
  ~ShmSegment();
  ShmSegment(ShmSegment&& other) noexcept;
  ShmSegment& operator=(ShmSegment&& other) noexcept;
  ShmSegment(const ShmSegment&) = delete;
  ShmSegment& operator=(const ShmSegment&) = delete;

  void unlink();  // removes the name; the mapping stays valid
  char* data() const { return data_; }
  size_t size() const { return bytes_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  char* data_ = nullptr;
  size_t bytes_ = 0;
  bool owner_linked_ = false;  // we created the name and have not unlinked it yet
};

}  // namespace ep
