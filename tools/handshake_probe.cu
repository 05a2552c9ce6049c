// The least a collective's call costs where R processes share the GPU (issue 16): the time per call
// of kernels that move no data but meet their peers as all_to_all's kernels do. Stand-alone (no
// torch), the ranks forked (tools/forked_ranks.hpp); run it under MPS, as gpu_suite.sh's ranks run:
//
//   nvcc -O3 -arch=sm_90 -std=c++17 -I. -o /tmp/handshake_probe tools/handshake_probe.cu
//   CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 /tmp/handshake_probe [ranks=2] [calls=2000]
//
// A call is one of (each in each rank's stream, the ranks started together by a barrier):
//   cudaMemcpyAsync of 4 KiB      the host's floor of any stream operation (the roofline's copy_)
//   an empty kernel               one launch, no peer
//   one meeting                   a kernel that tells every peer it arrived and waits until every
//                                 peer has: one flag's flight each way (system-scope release and
//                                 acquire through CUDA IPC mappings, the library's sync.cuh)
//   two meetings                  the direct kernel's protocol without its data: "my output is
//                                 ready" to every sender, then "your data is written" to every
//                                 receiver, each waited for
//   two kernels, one meeting each the device protocol's plan kernel and its move
// Each eagerly (a launch per call) and replayed (the call captured once in a CUDA graph, a
// cudaGraphLaunch per call). Timed back to back, `calls` per loop: the host's time to issue a call,
// the wall time per call to the last one's end, and the median gap between CUDA events recorded
// after each call (a second loop). The slowest rank's median of 5 rounds. The meetings count calls
// in a word of device memory (an epoch), so that replays meet as launches do.
#include <algorithm>
#include <chrono>
#include <cstdint>

#include "backend/kernels/sync.cuh"
#include "tools/forked_ranks.hpp"

using ep::kernels::load_acquire;
using ep::kernels::now_ns;
using ep::kernels::store_release;

constexpr int kMaxRanks = 8, kRounds = 5;
constexpr uint64_t kTimeoutNs = 5'000'000'000ull;  // a peer that never comes: the probe fails, no hang

struct alignas(128) Flags {  // in each rank's device memory: peers write flag[f][their rank]
  uint64_t flag[2][kMaxRanks];
  alignas(128) uint64_t epoch;  // the calls so far: written by this rank's kernels only
};

struct Peers {
  Flags* of[kMaxRanks];  // every rank's flags, this rank's own included (mapped through CUDA IPC)
  int rank, size;
  int* failed;  // host-mapped: a wait ran out
};

// Meets every peer on flags first .. first + count - 1 in turn; `bump` starts a call (its epoch).
__global__ void meet(Peers p, int first, int count, bool bump) {
  __shared__ uint64_t epoch;
  Flags* mine = p.of[p.rank];
  if (threadIdx.x == 0) epoch = bump ? ++mine->epoch : mine->epoch;
  __syncthreads();
  const int peer = threadIdx.x;
  if (peer >= p.size || peer == p.rank) return;
  const uint64_t deadline = now_ns() + kTimeoutNs;
  for (int f = first; f < first + count; ++f) {
    store_release(&p.of[peer]->flag[f][p.rank], epoch);
    while (load_acquire(&mine->flag[f][peer]) < epoch) {
      if (now_ns() > deadline) {
        *reinterpret_cast<volatile int*>(p.failed) = 1;
        return;
      }
      __nanosleep(100);  // as the library's waits poll
    }
  }
}

enum Variant { kMemcpy, kEmpty, kOneMeeting, kTwoMeetings, kTwoKernels, kVariants };
const char* const kNames[kVariants] = {"cudaMemcpyAsync of 4 KiB", "an empty kernel", "one meeting", "two meetings",
                                       "two kernels, one meeting each"};
enum Metric { kIssue, kWall, kEventGap, kMetrics };

struct Shared {
  RankBarrier ranks_met;
  char device[256];
  int sms;
  cudaIpcMemHandle_t flags[kMaxRanks];
  double us[kMaxRanks][kVariants][2][kMetrics];  // [rank][variant][replayed][metric], medians over the rounds
};

void issue(Variant v, const Peers& p, char* dst, const char* src, cudaStream_t stream) {
  switch (v) {
    case kMemcpy: CHECK(cudaMemcpyAsync(dst, src, 4096, cudaMemcpyDeviceToDevice, stream)); break;
    case kEmpty: meet<<<1, 32, 0, stream>>>(p, 0, 0, true); break;
    case kOneMeeting: meet<<<1, 32, 0, stream>>>(p, 0, 1, true); break;
    case kTwoMeetings: meet<<<1, 32, 0, stream>>>(p, 0, 2, true); break;
    case kTwoKernels:
      meet<<<1, 32, 0, stream>>>(p, 0, 1, true);
      meet<<<1, 32, 0, stream>>>(p, 1, 1, false);
      break;
    default: break;
  }
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

void rank_main(Shared* s, int me, int ranks, int calls) {
  CHECK(cudaSetDevice(0));
  if (me == 0) {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::snprintf(s->device, sizeof(s->device), "%s", prop.name);
    s->sms = prop.multiProcessorCount;
  }
  Flags* flags;
  CHECK(cudaMalloc(&flags, sizeof(Flags)));
  CHECK(cudaMemset(flags, 0, sizeof(Flags)));
  CHECK(cudaIpcGetMemHandle(&s->flags[me], flags));
  Peers p{};
  p.rank = me;
  p.size = ranks;
  CHECK(cudaHostAlloc(reinterpret_cast<void**>(&p.failed), sizeof(int), cudaHostAllocMapped));
  *p.failed = 0;
  CHECK(cudaDeviceSynchronize());
  s->ranks_met.wait(ranks);
  for (int r = 0; r < ranks; ++r) {
    p.of[r] = flags;
    if (r != me)
      CHECK(cudaIpcOpenMemHandle(reinterpret_cast<void**>(&p.of[r]), s->flags[r], cudaIpcMemLazyEnablePeerAccess));
  }
  char *src, *dst;
  CHECK(cudaMalloc(&src, 4096));
  CHECK(cudaMalloc(&dst, 4096));
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<cudaEvent_t> events(calls + 1);
  for (cudaEvent_t& e : events) CHECK(cudaEventCreate(&e));

  using Clock = std::chrono::steady_clock;
  auto us_since = [](Clock::time_point t) { return std::chrono::duration<double, std::micro>(Clock::now() - t).count(); };
  for (int v = 0; v < kVariants; ++v) {
    cudaGraphExec_t replay;
    {
      cudaGraph_t graph;
      CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      issue(Variant(v), p, dst, src, stream);
      CHECK(cudaStreamEndCapture(stream, &graph));
      CHECK(cudaGraphInstantiate(&replay, graph, 0));
      CHECK(cudaGraphDestroy(graph));
    }
    for (int replayed = 0; replayed < 2; ++replayed) {
      auto call = [&] {
        if (replayed) CHECK(cudaGraphLaunch(replay, stream));
        else issue(Variant(v), p, dst, src, stream);
      };
      for (int i = 0; i < 20; ++i) call();  // warm up, and the ranks' epochs stay alike: every rank makes every call
      CHECK(cudaStreamSynchronize(stream));
      std::vector<double> metric[kMetrics];
      for (int round = 0; round < kRounds; ++round) {
        s->ranks_met.wait(ranks);
        const auto start = Clock::now();
        for (int i = 0; i < calls; ++i) call();
        metric[kIssue].push_back(us_since(start) / calls);
        CHECK(cudaStreamSynchronize(stream));
        metric[kWall].push_back(us_since(start) / calls);

        s->ranks_met.wait(ranks);
        CHECK(cudaEventRecord(events[0], stream));
        for (int i = 0; i < calls; ++i) {
          call();
          CHECK(cudaEventRecord(events[i + 1], stream));
        }
        CHECK(cudaStreamSynchronize(stream));
        std::vector<double> gaps(calls);
        for (int i = 0; i < calls; ++i) {
          float ms = 0;
          CHECK(cudaEventElapsedTime(&ms, events[i], events[i + 1]));
          gaps[i] = ms * 1e3;
        }
        metric[kEventGap].push_back(median(gaps));
      }
      CHECK(cudaGetLastError());
      if (*reinterpret_cast<volatile int*>(p.failed)) {
        std::fprintf(stderr, "rank %d: %s: a meeting's wait ran out after %llu s\n", me, kNames[v],
                     (unsigned long long)(kTimeoutNs / 1000000000ull));
        std::exit(1);
      }
      for (int m = 0; m < kMetrics; ++m) s->us[me][v][replayed][m] = median(metric[m]);
    }
    CHECK(cudaGraphExecDestroy(replay));
  }
  s->ranks_met.wait(ranks);  // no rank unmaps its flags while a peer's last call may still write them
}

int main(int argc, char** argv) {
  const int ranks = argc > 1 ? std::atoi(argv[1]) : 2, calls = argc > 2 ? std::atoi(argv[2]) : 2000;
  if (ranks < 1 || ranks > kMaxRanks || calls < 100) {
    std::fprintf(stderr, "usage: %s [ranks=2, 1..%d] [calls=2000, >= 100]\n", argv[0], kMaxRanks);
    return 2;
  }
  Shared* s = run_forked<Shared>(ranks, [&](Shared* shared, int r) { rank_main(shared, r, ranks, calls); });
  if (!s) return 1;
  const char* mps = std::getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE");
  std::printf("%s, %d ranks (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=%s), %d calls back to back per loop, the slowest "
              "rank's median of %d rounds, us per call\n", s->device, ranks, mps ? mps : "unset", calls, kRounds);
  std::printf("| call | eager: host issues | eager: wall | eager: event gap | replayed: host issues | "
              "replayed: wall | replayed: event gap |\n|---|--:|--:|--:|--:|--:|--:|\n");
  for (int v = 0; v < kVariants; ++v) {
    std::printf("| %s |", kNames[v]);
    for (int replayed = 0; replayed < 2; ++replayed)
      for (int m = 0; m < kMetrics; ++m) {
        double slowest = 0;
        for (int r = 0; r < ranks; ++r) slowest = std::max(slowest, s->us[r][v][replayed][m]);
        std::printf(" %.1f |", slowest);
      }
    std::printf("\n");
  }
  return 0;
}
