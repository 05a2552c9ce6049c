// A Rendezvous among some ranks of another (a node, a rail): ranks are renumbered by their
// position in `ranks`, and keys go under `tag` so that subsets never meet in the store.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/transport/rendezvous.hpp"

namespace ep {

class SubsetRendezvous : public Rendezvous {
 public:
  // Collective over `ranks` only; `parent` must outlive this. `ranks` holds the parent's rank.
  SubsetRendezvous(Rendezvous& parent, std::vector<int> ranks, const std::string& tag)
      : parent_(parent), ranks_(std::move(ranks)), tag_(tag) {
    auto it = std::find(ranks_.begin(), ranks_.end(), parent_.rank());
    if (it == ranks_.end()) throw std::invalid_argument("SubsetRendezvous: this rank is not in the subset");
    rank_ = int(it - ranks_.begin());
  }
  int rank() const override { return rank_; }
  int size() const override { return int(ranks_.size()); }
  int group_rank(int rank) const override { return parent_.group_rank(ranks_.at(size_t(rank))); }
  void set(const std::string& key, const std::vector<uint8_t>& value) override { parent_.set(tag_ + "/" + key, value); }
  std::vector<uint8_t> get(const std::string& key) override { return parent_.get(tag_ + "/" + key); }
  void barrier(const std::string& tag) override {
    // Bounded by the parent's get: a key per member, so a timeout names the one that never came.
    set(tag + "/" + std::to_string(rank_), {1});
    for (int r = 0; r < size(); ++r)
      if (r != rank_) get(tag + "/" + std::to_string(r));
  }

 private:
  Rendezvous& parent_;
  std::vector<int> ranks_;
  std::string tag_;
  int rank_ = 0;
};

}  // namespace ep
