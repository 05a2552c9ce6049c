// All-to-all between the ranks of one host through POSIX shared memory.
//
// Each rank owns one segment: its inbox. For every peer `src` the inbox holds a channel, a ring
// of `num_slots` slots of `slot_bytes` each, that only `src` writes and only the owner reads.
// A message of any size streams through the ring in slot-sized chunks; head (slots published,
// written by the sender) and tail (slots released, written by the receiver) are monotonic
// counters, so nothing is reset between calls. Every message takes at least one slot, whose
// header carries the message's sequence number and size: a receiver detects ranks that
// disagree on split sizes or on the order of calls instead of reading garbage.
// A receiver takes no slot before it has checked the first slot of every peer's message, and a
// sender's call ends only once the receiver has taken all of its slots: ranks that disagree
// all raise in the same call (see all_to_all).
// Messages of kOneCopyBytes and more take one copy instead of two when the kernel allows
// cross-memory attach between the ranks (checked once at set-up): the sender posts a descriptor
// (pid, address) in its slot, and the receiver reads the data straight out of the sender's
// memory with process_vm_readv before it releases the slot.
// This is the protocol shape of the CUDA intranode path, so CPU tests exercise the same logic.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "backend/transport/host/doorbell.hpp"
#include "backend/transport/host/peer_processes.hpp"
#include "backend/transport/host/shm_segment.hpp"
#include "backend/transport/rendezvous.hpp"

namespace ep {

struct HostTransportConfig {
  size_t slot_bytes = 256 << 10;  // one chunk; rounded up to 64 bytes
  int num_slots = 8;              // chunks in flight per (sender, receiver) pair
  bool one_copy = true;           // large messages by process_vm_readv where the kernel allows it
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
};

struct SendBuffer {
  const void* ptr;
  size_t bytes;
};
struct RecvBuffer {
  void* ptr;
  size_t bytes;  // what this rank expects; the sender's header must agree
};

class HostTransport {
 public:
  // Collective: every rank of `rdv` constructs its transport with the same `tag`.
  HostTransport(Rendezvous& rdv, const HostTransportConfig& config, const std::string& tag);
  ~HostTransport();

  // sends[p] goes to rank p, recvs[p] receives from rank p (both indexed by rank, self included).
  // Throws TimeoutError when a peer does not keep up within the timeout, CommError when the
  // ranks disagree; after either the transport refuses further calls.
  void all_to_all(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs, const char* op_name);

  // Fails any wait in progress and every later call (from any thread); peers in a call with
  // this rank fail too, naming `why`.
  void abort(const std::string& why);

  int rank() const { return rank_; }
  int size() const { return size_; }
  // True when large messages move with one copy (cross-memory attach works between all ranks).
  bool one_copy() const { return one_copy_; }
  static constexpr size_t kOneCopyBytes = 64 << 10;

 private:
  struct SegmentHeader;
  struct ChannelControl;
  struct SlotHeader;

  static size_t controls_offset();
  SegmentHeader* header(int owner) const;
  ChannelControl* channel(int owner, int src) const;
  SlotHeader* slot(int owner, int src, uint64_t index) const;
  bool probe_one_copy(Rendezvous& rdv, const std::string& tag);  // collective; after peers_
  static constexpr std::chrono::milliseconds kLivenessPeriod{100};  // how often a stalled wait checks peers_
  // Records the first error (later calls raise it) and tells the peers, whose waits on this
  // rank then fail at once instead of at their timeout. `cause`, where given, is what the peers
  // read instead of `message`: the first error of a chain of ranks stopping for one another, so
  // that it fits the header's failure and still names the rank that failed first.
  void stop(const std::string& message, const std::string& cause = "");
  void fail(const std::string& message, const std::string& cause = "");  // stop(), then throws CommError
  // Fails unless `s` is the next message from `src` and carries `expected_bytes`.
  void check_slot(const SlotHeader* s, int src, size_t expected_bytes, const char* op_name);
  [[noreturn]] void raise_broken() const;

  int rank_;
  // Each member's rank in the whole group (a node's channel across nodes is a subset of it):
  // what errors name, as the user counts ranks.
  std::vector<int> group_ranks_;
  std::string name(int member) const {
    return member >= 0 && member < int(group_ranks_.size()) ? std::to_string(group_ranks_[size_t(member)])
                                                             : std::to_string(member);
  }
  int size_;
  size_t slot_bytes_;
  size_t slot_stride_;
  int num_slots_;
  std::chrono::milliseconds timeout_;
  int spin_;  // polls before sleeping; 0 when ranks outnumber cores
  std::vector<ShmSegment> segments_;
  std::vector<uint64_t> send_seq_;  // messages sent to each peer
  std::vector<uint64_t> recv_seq_;  // messages received from each peer
  bool one_copy_ = false;
  PeerProcesses peers_;  // a killed peer is named at once, not at the timeout
  std::atomic<bool> broken_{false};
  mutable std::mutex broken_mutex_;
  std::string broken_message_;  // under broken_mutex_
};

}  // namespace ep
