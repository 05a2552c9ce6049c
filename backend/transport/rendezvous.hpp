// The control plane the transports need at set-up: a key/value exchange among the ranks of
// one group. ProcessGroupEP implements it on the c10d Store; transports stay torch-free.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace ep {

class Rendezvous {
 public:
  virtual ~Rendezvous() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The rank that errors name for member `rank`: the same here; the whole group's rank where
  // this is a subset of it (a node's ranks), so that messages name ranks as the user counts them.
  virtual int group_rank(int rank) const { return rank; }
  virtual void set(const std::string& key, const std::vector<uint8_t>& value) = 0;
  // Blocks until `key` exists (bounded by the group timeout).
  virtual std::vector<uint8_t> get(const std::string& key) = 0;
  // Every rank publishes `value` under `tag`; returns all ranks' values, indexed by rank.
  std::vector<std::vector<uint8_t>> all_gather(const std::string& tag,
                                               const std::vector<uint8_t>& value);
  // Returns once every rank has reached the barrier named `tag`.
  virtual void barrier(const std::string& tag) = 0;
};

std::vector<uint8_t> to_bytes(const std::string& s);

}  // namespace ep
