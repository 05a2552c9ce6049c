#include "backend/transport/host/peer_processes.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace ep {

namespace {
// When process `pid` started (field 22 of /proc/pid/stat, clock ticks since boot); 0 when it is
// gone, a zombie (killed, not yet reaped) or unreadable.
uint64_t process_start_time(uint64_t pid) {
  char path[64], buf[1024];
  std::snprintf(path, sizeof(path), "/proc/%llu/stat", (unsigned long long)pid);
  FILE* f = std::fopen(path, "r");
  if (!f) return 0;
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* p = std::strrchr(buf, ')');  // the command name may hold spaces and parentheses
  if (!p || p[1] != ' ' || p[2] == 0 || p[2] == 'Z' || p[2] == 'X') return 0;
  p += 2;  // field 3, the state
  for (int field = 3; field < 22; ++field) {
    p = std::strchr(p, ' ');
    if (!p) return 0;
    ++p;
  }
  return std::strtoull(p, nullptr, 10);
}
}  // namespace

PeerProcesses::PeerProcesses(Rendezvous& rdv, const std::string& tag) {
  const uint64_t me[2] = {uint64_t(getpid()), process_start_time(uint64_t(getpid()))};
  const auto* bytes = reinterpret_cast<const uint8_t*>(me);
  auto all = rdv.all_gather(tag + "/processes", std::vector<uint8_t>(bytes, bytes + sizeof(me)));
  pid_.assign(rdv.size(), 0);
  start_.assign(rdv.size(), 0);
  for (int r = 0; r < rdv.size(); ++r) {
    uint64_t peer[2];
    std::memcpy(peer, all[r].data(), sizeof(peer));
    pid_[r] = peer[0];
    if (r != rdv.rank() && peer[1] != 0 && process_start_time(peer[0]) == peer[1]) start_[r] = peer[1];
  }
}

bool PeerProcesses::gone(int rank) const {
  return start_[rank] && process_start_time(pid_[rank]) != start_[rank];
}

std::string PeerProcesses::gone_message(const char* op_name, const std::string& me, int peer,
                                        const std::string& peer_name) const {
  return std::string(op_name) + ": rank " + me + " stopped because peer rank " + peer_name + " exited (its process " +
         std::to_string(pid_[peer]) + " is gone)";
}

}  // namespace ep
