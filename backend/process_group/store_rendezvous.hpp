// Rendezvous on a c10d Store: the group's (prefixed) store carries set-up exchanges.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "backend/common/errors.hpp"
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
    try {
      store_->wait({key}, timeout_);
    } catch (const c10::Error& e) {  // the store's own message, without its C++ backtrace
      throw TimeoutError("rank " + std::to_string(rank_) + " waited " + std::to_string(timeout_.count()) +
                         " ms for '" + key + "' in the store (" + e.what_without_backtrace() + ")");
    }
    return store_->get(key);
  }
  void barrier(const std::string& tag) override {
    // A key per rank, so that a timeout names the ranks that never came.
    std::vector<std::string> keys;
    for (int r = 0; r < size_; ++r) keys.push_back(tag + "/" + std::to_string(r));
    store_->set(keys[rank_], std::vector<uint8_t>{1});
    try {
      store_->wait(keys, timeout_);
    } catch (const c10::Error&) {
      std::string missing;
      for (int r = 0; r < size_; ++r)
        if (!store_->check({keys[r]})) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      throw TimeoutError("rank " + std::to_string(rank_) + " waited " + std::to_string(timeout_.count()) +
                         " ms at barrier '" + tag + "' for rank(s) " + missing + ", which never arrived");
    }
  }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
};

}  // namespace ep
