// The processes of a group's peers on this host, to tell a killed rank at once.
//
// A peer that dies (SIGKILL, a crash, the OOM killer) never reports its own failure, so its
// peers would wait for their timeout, 30 minutes by default. Every rank publishes its pid and its
// process's start time; a waiting rank then checks, now and then, that each peer's process still
// runs. A peer is watched only where this rank sees that very process (same pid and start time),
// so ranks in separate pid namespaces sharing /dev/shm are never called dead, and a recycled pid
// is not taken for the peer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend/transport/rendezvous.hpp"

namespace ep {

class PeerProcesses {
 public:
  PeerProcesses() = default;
  // Collective: every rank of `rdv` constructs it with the same `tag`.
  PeerProcesses(Rendezvous& rdv, const std::string& tag);

  // True when `rank` is watched and its process is gone (exited, killed, or a zombie). Ask only
  // about peers a call still waits on: one that finished its part and exited is no fault.
  bool gone(int rank) const;
  uint64_t pid(int rank) const { return pid_[rank]; }  // as that rank published it (its own namespace)
  // "<op>: rank <me> stopped because peer rank <p> exited (its process <pid> is gone)"
  // `me` and `peer_name`: the ranks as errors name them (Rendezvous::group_rank).
  std::string gone_message(const char* op_name, const std::string& me, int peer, const std::string& peer_name) const;

 private:
  std::vector<uint64_t> pid_;    // per rank
  std::vector<uint64_t> start_;  // its process's start time, 0 where not watched
};

}  // namespace ep
