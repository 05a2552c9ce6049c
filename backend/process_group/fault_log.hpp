// Where a group's ranks leave the first error that stopped them, so that a rank that stops
// because another stopped can name the first cause. Across nodes a rank waits on a live peer
// that is itself stuck on a dead one: "rank 3 waited for rank 0" hides that rank 0 waited for
// rank 1, which died. The host transport carries such causes in its shared memory; this log
// carries them through the group's c10d Store (TCP), which every node reaches.
//
// Keys, under the group's store: ep/fault/<instance>/<rank> (a rank's record),
// .../count and .../order/<n> (which rank recorded n-th: the store's arrival order, the same
// for every rank, unlike wall clocks across nodes). Only the error path touches them, and every
// store call runs on a helper thread with a deadline: a store whose host died costs that
// deadline once, after which the log stops asking.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace ep {

struct FaultRecord {
  int rank = -1;
  int peer = -1;        // the rank its message blames first (first_peer_named), or -1
  int64_t time_ms = 0;  // wall clock (ms since the epoch): for people reading the store
  std::string op;       // the op the message starts with, or ""
  std::string message;
};

std::string serialize_fault(const FaultRecord& record);
std::optional<FaultRecord> parse_fault(const std::string& text);

// The first rank other than `self` that `message` names ("rank 3 ... for rank 0" -> 0, "peer
// rank(s) 1, 2" -> 1), or -1. torch_ep's errors name the rank they stopped on first after their
// own, so this is the peer a rank waited for, or the one whose stop it relays.
int first_peer_named(const std::string& message, int self);
// The op a message starts with ("all_to_all_single: ..." or "check_errors on rank 3: ..."), or "".
std::string op_named(const std::string& message);

// What `message` (rank `self`'s error, blaming `peer`) gains from the records: following the
// chain from `peer` (a record that blames a further rank leads to it) to the first cause, and
// naming the rank where it ends without a record (likely the dead one). Where `peer` recorded
// nothing, the earliest of `earlier` (records that reached the store before this rank's, in
// that order) that does not blame `self` stands in. Returns the suffix to append, or "".
std::string root_cause_suffix(int self, int peer, const std::function<std::optional<FaultRecord>(int)>& lookup,
                              const std::vector<FaultRecord>& earlier);

class FaultLog {
 public:
  // `prefix`: the key namespace of this group instance (ends with '/').
  FaultLog(c10::intrusive_ptr<c10d::Store> store, std::string prefix, int rank, int size);
  // Every rank of a group calls this once at the group's creation (one store round trip): an
  // id of this instance of the group that all its ranks agree on (rank r's n-th group on this
  // store), so that records of an earlier group of the same name and store are never read.
  static std::string instance_prefix(c10d::Store& store, int rank);

  // Publishes `message` as this rank's error, once (the first call; later ones return at once).
  // `wait` false (watchdogs, workers): the store call goes on alone, so that a store whose host
  // died holds no one; the caller that raises records with a wait.
  void record(const std::string& message, bool wait = true);
  // `message` with the first cause other ranks recorded appended, where one is found: waits up
  // to kGrace for the peer it names to record (it may time out a hair later than this rank).
  // The suffix found for a peer is reused: only the first error of a group waits.
  std::string explain(const std::string& message);
  // record, then explain: the error path of every CUDA op.
  std::string report(const std::string& message) {
    record(message);
    return explain(message);
  }

  static constexpr std::chrono::milliseconds kGrace{500};
  // Longest a caller waits for the store: the grace, lookups, and a margin.
  static constexpr std::chrono::milliseconds kDeadline{1500};

 private:
  struct Shared;
  std::shared_ptr<Shared> shared_;
  int rank_;
  std::mutex mutex_;
  bool recorded_ = false;
  std::map<int, std::string> suffixes_;  // causes found, by blamed peer
  std::set<int> graced_;                 // peers this rank has waited kGrace for already
};

}  // namespace ep
