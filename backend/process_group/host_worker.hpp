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
  // Throws once stop() has begun: a task queued then would never run, and its Work never end.
  void enqueue(std::function<void()> task);
  // Runs what is queued, then joins. Safe to call twice, or from several threads.
  void stop();

 private:
  void loop();
  std::mutex stop_mutex_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace ep
