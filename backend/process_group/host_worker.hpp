// One thread per group that runs host-side ops in the order they were issued. Collectives must
// run in the same order on every rank; a FIFO on one thread keeps that order while the caller
// gets its Work back at once (async_op).
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace ep {

class HostWorker {
 public:
  HostWorker() = default;
  ~HostWorker() { stop(); }
  void enqueue(std::function<void()> task);
  void stop();  // runs what is queued, then joins

 private:
  void loop();
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace ep
