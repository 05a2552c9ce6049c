// The harness of the stand-alone multi-rank probes (tools/*.cu, no torch): R processes forked
// before any CUDA call, each its own context (an MPS client, as the library's ranks are), sharing
// a block of anonymous memory for their handles, results and a barrier.
#pragma once

#include <cuda_runtime.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <thread>
#include <vector>

#define CHECK(x)                                                                                             \
  do {                                                                                                       \
    if (cudaError_t e_ = (x); e_ != cudaSuccess)                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)), std::exit(1); \
  } while (0)

struct RankBarrier {  // lives in the shared block; spins, as the ranks arrive within microseconds
  std::atomic<int> arrived{0}, generation{0};

  void wait(int ranks) {
    const int seen = generation.load();
    if (arrived.fetch_add(1) + 1 == ranks) {
      arrived.store(0);
      generation.fetch_add(1);
    } else {
      while (generation.load() == seen) std::this_thread::yield();
    }
  }
};

// Runs rank_main(shared, rank) in `ranks` forked processes and returns the shared block once every
// rank exited with 0, or nullptr (the others killed: they would wait at a barrier for ever).
// Shared must be default-constructible in place and hold only what shared memory can (atomics, PODs).
template <typename Shared, typename RankMain>
Shared* run_forked(int ranks, RankMain rank_main) {
  void* memory = mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return nullptr;
  Shared* s = new (memory) Shared();
  std::vector<pid_t> children;
  for (int r = 0; r < ranks; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // a timeout that kills the probe ends its ranks too
      rank_main(s, r);
      std::_Exit(0);
    }
    children.push_back(pid);
  }
  bool failed = false;
  for (size_t left = children.size(); left > 0; --left) {
    int status = 0;
    const pid_t pid = wait(&status);
    if (pid < 0 || (WIFEXITED(status) && WEXITSTATUS(status) == 0)) continue;
    failed = true;
    for (pid_t other : children)
      if (other != pid) kill(other, SIGKILL);
  }
  return failed ? nullptr : s;
}
