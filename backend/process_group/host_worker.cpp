#include "backend/process_group/host_worker.hpp"

#include <pthread.h>

#include <stdexcept>

namespace ep {

void HostWorker::enqueue(std::function<void()> task) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopping_) throw std::runtime_error("torch_ep: this process group was shut down and takes no more calls");
  if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
  queue_.push_back(std::move(task));
  cv_.notify_one();
}

void HostWorker::stop() {
  std::lock_guard<std::mutex> one_at_a_time(stop_mutex_);  // a second caller returns after the join
  std::thread thread;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    thread = std::move(thread_);  // thread_ is only touched under mutex_
  }
  cv_.notify_all();
  if (thread.joinable()) thread.join();
}

void HostWorker::loop() {
  pthread_setname_np(pthread_self(), "torch_ep_worker");  // shows in gdb, top and /proc: easy to spot
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();  // tasks catch their own errors and complete their Work
  }
}

}  // namespace ep
