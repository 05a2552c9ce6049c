// Rendezvous on a c10d Store: the group's (prefixed) store carries set-up exchanges.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "backend/transport/rendezvous.hpp"

namespace ep {

class StoreRendezvous : public Rendezvous {
 public:
  StoreRendezvous(c10::intrusive_ptr<c10d::Store> store, int rank, int size, std::chrono::milliseconds timeout)
      : store_(std::move(store)), rank_(rank), size_(size), timeout_(timeout) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void set(const std::string& key, const std::vector<uint8_t>& value) override { store_->set(key, value); }
  std::vector<uint8_t> get(const std::string& key) override {
    store_->wait({key}, timeout_);
    return store_->get(key);
  }
  void barrier(const std::string& tag) override {
    if (store_->add(tag + "/arrived", 1) == size_) store_->set(tag + "/done", std::vector<uint8_t>{1});
    store_->wait({tag + "/done"}, timeout_);
  }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
};

}  // namespace ep
